"""The guard on every call of a shardps gRPC server (`CallGuard`, installed by
rpc.make_server): no handler thread waits on a client without a limit of the server's own.

gRPC Python waits for a unary call's request inside its own code with no limit but the
client's deadline (none, if the client sets none), and a streaming handler waits in `next()`
on the request iterator the same way; a silent client holds a handler thread for as long as
it likes. So every handler is registered as a streaming-request one (the same on the wire)
and its waits happen here: a call's first message (a unary request, a stream's header)
within REQUEST_WAIT_S, each later message, and each reply the client must take, within
CLIENT_WAIT_S, and all of one call's waits together within `total_wait_s`. Past a limit a
watchdog thread ends the call DEADLINE_EXCEEDED, saying which wait ran over; the handler,
woken by that, aborts too. Request bytes that do not parse are answered INVALID_ARGUMENT
with one log line (gRPC would answer INTERNAL and log a traceback).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

REQUEST_WAIT_S = 10.0   # a call's first message (a unary call's request, a stream's header)
CLIENT_WAIT_S = 30.0    # a stream's next message; the client taking the next reply

# Which thread pool a method's handler runs on (None: the server's own).
PoolFor = Callable[[str, grpc.RpcMethodHandler], "futures.ThreadPoolExecutor | None"]

_log = logging.getLogger("shardps.rpc")


class _Unparsable:
    """What a request deserializer gives for bytes it cannot parse (instead of raising, which
    gRPC answers INTERNAL with a traceback in the log)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def read(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # whatever the bytes make a parser raise
            return _Unparsable(f"{type(exc).__name__}: {exc}"[:200])

    return read


class _Watch:
    """A call's waits on its client. The watchdog ends the call (DEADLINE_EXCEEDED, which the
    client gets with the reason) once a wait runs over; the handler, woken by that, then
    aborts too (`done`). Thread-safe."""

    __slots__ = ("context", "method", "_total", "_lock", "_since", "_limit", "_what", "_waited", "expired")

    def __init__(self, context: grpc.ServicerContext, method: str, total_wait_s: float):
        self.context = context
        self.method = method
        self._total = total_wait_s
        self._lock = threading.Lock()
        self._since: float | None = None  # when the current wait began
        self._limit = 0.0
        self._what = ""
        self._waited = 0.0                # the waits before it, together
        self.expired: str | None = None

    def wait(self, what: str, limit: float) -> None:
        with self._lock:
            self._what, self._limit, self._since = what, limit, time.monotonic()

    def done(self) -> None:
        """Ends the current wait; aborts the call if the watchdog has ended it."""
        with self._lock:
            if self._since is not None:
                self._waited += time.monotonic() - self._since
                self._since = None
            expired = self.expired
        if expired is not None:
            self.context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, expired)

    def check(self, now: float) -> None:
        """Called by the watchdog: ends the call if its current wait has run over."""
        with self._lock:
            if self._since is None or self.expired is not None:
                return
            waited = now - self._since
            if waited > self._limit:
                why = f"no {self._what} from the client within {self._limit:g} s"
            elif self._waited + waited > self._total:
                why = f"the client kept the call waiting over {self._total:g} s in all"
            else:
                return
            self.expired = why
        _log.info("%s from %s ended: %s", self.method, _peer(self.context), why)
        _cancel(self.context, grpc.StatusCode.DEADLINE_EXCEEDED, why)


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Ends a call from outside its handler, the client getting `code` and `details`. The
    public context.cancel() can only say CANCELLED; the core call says what we mean."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:  # another gRPC: what the public API allows
        context.cancel()


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "?"


class _Watchdog:
    """One thread per process that checks every watched call a few times a second."""

    PERIOD_S = 0.25

    def __init__(self) -> None:
        self._calls: set[_Watch] = set()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, watch: _Watch) -> None:
        with self._cond:
            self._calls.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grpc-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, watch: _Watch) -> None:
        with self._cond:
            self._calls.discard(watch)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._calls:
                    self._cond.wait()
                calls = list(self._calls)
            now = time.monotonic()
            for watch in calls:
                try:
                    watch.check(now)
                except Exception:  # pragma: no cover - never let one call stop the watchdog
                    _log.exception("watchdog: checking %s failed", watch.method)
            time.sleep(self.PERIOD_S)



def _requests(iterator: Iterator[Any], watch: _Watch) -> Iterator[Any]:
    """The call's request messages, each waited for under a limit, none unparsable. The first
    (a unary call's request, a stream's header) is sent at once by any real client, so its
    limit is the shorter one."""
    limit, what = REQUEST_WAIT_S, "request message"
    while True:
        watch.wait(what, limit)
        try:
            item = next(iterator)
        except StopIteration:
            watch.done()
            return
        except grpc.RpcError:  # the client went away (or the watchdog ended the call)
            watch.done()
            raise
        watch.done()
        if isinstance(item, _Unparsable):
            _log.warning("%s from %s: the request does not parse (%s)", watch.method,
                         _peer(watch.context), item.error)
            watch.context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {item.error}")
        yield item
        limit, what = CLIENT_WAIT_S, "next message"


def _replies(responses: Iterator[Any], watch: _Watch) -> Iterator[Any]:
    """The call's replies; gRPC sends each while this generator is suspended at its yield."""
    try:
        for response in responses:
            watch.wait("read of the reply stream", CLIENT_WAIT_S)
            yield response
            watch.done()
    finally:
        close = getattr(responses, "close", None)
        if close is not None:
            close()


class CallGuard(grpc.ServerInterceptor):
    """Wraps every method handler as the module docstring says, on the pool `pool_for`
    names. Thread-safe (gRPC calls it for every call, before the handler runs)."""

    def __init__(self, pool_for: PoolFor, total_wait_s: float):
        self._pool_for = pool_for
        self._total_wait_s = total_wait_s
        self._cache: dict[int, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._cache.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guarded(handler, details.method, self._pool_for(details.method, handler),
                           self._total_wait_s)
        self._cache[id(handler)] = (handler, guarded)
        return guarded


def _guarded(handler: grpc.RpcMethodHandler, method: str, pool: futures.ThreadPoolExecutor | None,
             total_wait_s: float) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if inner is None:
        raise ValueError(f"{method}: the handler has no behaviour")
    non_blocking = bool(getattr(inner, "experimental_non_blocking", False))
    unary_request = not handler.request_streaming
    wrap_replies = handler.response_streaming and not non_blocking

    def behavior(request_iterator: Iterator[Any], context: grpc.ServicerContext, *callback: Any) -> Any:
        watch = _Watch(context, method, total_wait_s)
        _watchdog.add(watch)
        if not context.add_callback(lambda: _watchdog.remove(watch)):
            _watchdog.remove(watch)  # the call is over already
        requests = _requests(request_iterator, watch)
        if unary_request:
            argument = next(requests, None)
            if argument is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes exactly one request message")
        else:
            argument = requests
        result = inner(argument, context, *callback)
        return _replies(result, watch) if wrap_replies else result

    if non_blocking:
        behavior.experimental_non_blocking = True  # type: ignore[attr-defined]
    chosen = pool or getattr(inner, "experimental_thread_pool", None)
    if chosen is not None:
        behavior.experimental_thread_pool = chosen  # type: ignore[attr-defined]
    deserializer = _tolerant(handler.request_deserializer)
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(
        behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)


_watchdog = _Watchdog()
