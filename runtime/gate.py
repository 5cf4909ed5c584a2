"""Admission for the TCP servers that are not gRPC (the data plane, the metrics endpoint): no
connection gets a thread, or any other lasting resource, before it has sent what it opens with.

One thread per listener accepts connections and, without blocking, runs each one's TLS
handshake and reads its opening (the data plane's hello, an HTTP request head) under one
deadline for the whole of it, counted from the accept. At most `max_pending` connections are
in that state: beyond it, the source that holds the most of them (an IPv4 address, an IPv6
/64) loses its oldest, so that slow or silent clients can hold at most that many sockets for
at most the deadline, and one flooding host cannot push out another host's connection while
it completes its handshake and opening (a host with fewer pending connections than the
flooder keeps them). What happens
next is the opening's to say (`opening`): read more, reply and close (the reply is written
under the same deadline), or hand the socket over (the data plane starts a thread for it).

Thread-safety: `start` and `stop` from one thread; `opening` and every `Handoff` run on the
gate's thread.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("shardps.gate")

DEADLINE_S = 5.0       # TLS handshake and opening, all of it, from the accept
MAX_PENDING = 128      # connections still in their handshake or opening
_ACCEPTS_PER_PASS = 64  # then the pending connections get their turn
_WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class Reply:
    """Send these bytes (under the same deadline), then close."""

    data: bytes


@dataclass(frozen=True)
class Handoff:
    """The opening is complete: `take(sock)` owns the socket from now on (blocking mode, no
    timeout set; a TLS socket with its handshake done)."""

    take: Callable[[socket.socket], None]


# opening(bytes read so far) -> how many more bytes to read at most (> 0), a Reply or a Handoff.
# The gate never reads more than asked, so nothing after the opening is consumed.
Opening = Callable[[bytes], int | Reply | Handoff]


class _Pending:
    __slots__ = ("sock", "source", "deadline", "data", "out", "handshaking", "events")

    def __init__(self, sock: socket.socket, source: str, deadline: float, handshaking: bool):
        self.sock = sock
        self.source = source  # source_of(the peer's address)
        self.deadline = deadline
        self.data = bytearray()
        self.out: memoryview | None = None  # a reply being written
        self.handshaking = handshaking
        self.events = selectors.EVENT_READ


class Gate:
    """Accepts on `listener` (bound and listening; the gate closes it when it stops)."""

    def __init__(self, listener: socket.socket, opening: Opening, *, name: str,
                 context: ssl.SSLContext | None = None, deadline_s: float = DEADLINE_S,
                 max_pending: int = MAX_PENDING):
        self.name = name
        self._listener = listener
        self._opening = opening
        self._context = context
        self._deadline_s = deadline_s
        self._max_pending = max_pending
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        # The same connections by source, each source's oldest first.
        self._sources: dict[str, collections.OrderedDict[int, _Pending]] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = 0.0
        # Counters, for tests and logs (written by the gate thread only).
        self.dropped = 0   # pushed out by newer connections (of the busiest source)
        self.expired = 0   # past the deadline

    def start(self) -> None:
        self._listener.setblocking(False)
        self._wake_r.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops accepting and closes every connection still in its opening."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._close_all()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the gate's thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                timeout = None
                if self._pending:
                    oldest = next(iter(self._pending.values()))
                    timeout = max(0.0, oldest.deadline - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        _drain(self._wake_r)
                    else:
                        pending: _Pending = key.data
                        if self._pending.get(pending.sock.fileno()) is pending:
                            self._advance(pending)
                self._expire()
        except Exception:  # pragma: no cover - a bug here must not end the listener silently
            log.exception("%s: the accept loop failed; no more connections are accepted", self.name)
        finally:
            self._close_all()

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_PASS):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free one, else wait a moment (the listener stays
                    # readable, so an immediate retry would spin).
                    self._warn(f"cannot accept: {exc.strerror}")
                    if self._pending:
                        self._drop(self._victim())
                    else:
                        time.sleep(0.1)
                return
            self._admit(sock, source_of(peer))

    def _admit(self, sock: socket.socket, source: str) -> None:
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_side=True,
                                                 do_handshake_on_connect=False)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.debug("%s: connection lost at accept: %s", self.name, exc)
            sock.close()
            return
        pending = _Pending(sock, source, time.monotonic() + self._deadline_s,
                           self._context is not None)
        self._pending[sock.fileno()] = pending
        self._sources.setdefault(source, collections.OrderedDict())[sock.fileno()] = pending
        self._selector.register(sock, selectors.EVENT_READ, pending)
        while len(self._pending) > self._max_pending:
            victim = self._victim()
            self._warn(f"{self._max_pending} connections are in their handshake or opening "
                       f"(slow or hostile clients?): the oldest of {victim.source}'s "
                       f"{len(self._sources[victim.source])} make room for new ones")
            self.dropped += 1
            self._drop(victim)
        if self._pending.get(sock.fileno()) is pending:
            self._advance(pending)  # what it opens with is often there already

    def _victim(self) -> _Pending:
        """The oldest pending connection of the source that holds the most (of the sources
        that hold the most, the one whose oldest is oldest). One flooding source loses its
        own connections, not other sources'; only sources that each hold as many as the
        busiest (a flood from more than `max_pending` addresses) can push out each other's."""
        busiest = max(self._sources.values(),
                      key=lambda queue: (len(queue), -next(iter(queue.values())).deadline))
        return next(iter(busiest.values()))

    def _advance(self, p: _Pending) -> None:
        """Moves a connection on as far as it can go without blocking."""
        try:
            if p.out is None and p.handshaking:
                assert isinstance(p.sock, ssl.SSLSocket)
                p.sock.do_handshake()
                p.handshaking = False
            while p.out is None:
                step = self._opening(bytes(p.data))
                if isinstance(step, Handoff):
                    self._hand_over(p, step)
                    return
                if isinstance(step, Reply):
                    p.out = memoryview(step.data)
                    break
                chunk = p.sock.recv(step)
                if not chunk:
                    self._close(p, "closed by the peer during its opening")
                    return
                p.data += chunk
            while p.out:
                sent = p.sock.send(p.out)
                p.out = p.out[sent:]
            self._close(p, "replied")
        except ssl.SSLWantWriteError:
            self._want(p, selectors.EVENT_WRITE)
        except ssl.SSLWantReadError:
            self._want(p, selectors.EVENT_READ)
        except (BlockingIOError, InterruptedError):
            self._want(p, selectors.EVENT_WRITE if p.out else selectors.EVENT_READ)
        except (OSError, ssl.SSLError) as exc:
            self._close(p, f"failed: {exc}")
        except Exception:
            log.exception("%s: a connection's opening could not be handled", self.name)
            self._close(p, "failed")

    def _want(self, p: _Pending, events: int) -> None:
        if p.events != events:
            p.events = events
            self._selector.modify(p.sock, events, p)

    def _hand_over(self, p: _Pending, step: Handoff) -> None:
        self._forget(p)
        try:
            p.sock.setblocking(True)
        except OSError as exc:
            log.debug("%s: connection lost at handoff: %s", self.name, exc)
            p.sock.close()
            return
        step.take(p.sock)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if oldest.deadline > now:
                return
            self.expired += 1
            self._close(oldest, f"no complete opening within {self._deadline_s:g} s")

    def _drop(self, p: _Pending) -> None:
        self._close(p, "pushed out by newer connections")

    def _close(self, p: _Pending, why: str) -> None:
        log.debug("%s: connection closed: %s", self.name, why)
        self._forget(p)
        p.sock.close()

    def _forget(self, p: _Pending) -> None:
        fileno = p.sock.fileno()
        if self._pending.pop(fileno, None) is not None:
            queue = self._sources[p.source]
            del queue[fileno]
            if not queue:
                del self._sources[p.source]
        try:
            self._selector.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _close_all(self) -> None:
        for p in list(self._pending.values()):
            self._close(p, "the server stops")
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            log.warning("%s: %s", self.name, message)


def source_of(peer: object) -> str:
    """Whom a connection counts against: its IPv4 address, or the /64 of its IPv6 address (the
    least a host on IPv6 is usually given, so one host cannot pose as many); an IPv4 address
    mapped into IPv6 counts as itself."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    if not isinstance(host, str):
        return ""  # not an IP socket
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(64):
            pass
    except OSError:
        pass
