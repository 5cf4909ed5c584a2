"""A link with delay, jitter, loss, a rate and a cut switch between two network namespaces,
emulated in userspace: netem for kernels without sch_netem. A relay process
(bench/tunrelay.py) creates a TAP device in each namespace and moves every frame between them
through bench/linkmodel.py, so the kernel TCP stacks on both sides see real delay and real
loss (and retransmit).

  link = Link(("ns1", "eth0"), ("ns2", "eth0"), ab=Spec(delay_ms=20, loss=0.05), seed=1)
  ... configure the devices (addresses, up) with ip ...
  link.cut(); link.heal(); link.stats()["ab"]["lost"]
  link.close()

TAP rather than TUN (both are /dev/net/tun): a TAP device carries Ethernet frames, so it can
be a bridge port and ARP works across it; bench/netns.py puts one in place of a host's veth.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.linkmodel import Spec

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 10.0
MAX_LIFETIME_S = 4 * 3600.0
NONE = Spec()  # a direction that passes every frame at once

__all__ = ["Link", "Spec", "TunlinkError"]


class TunlinkError(RuntimeError):
    """The relay did not start, did not answer, or refused a command; the message says which
    and carries its stderr."""


class Link:
    """One running relay between (namespace, device) a and b; the devices exist while it runs.
    Not thread-safe: the creating thread owns it. close() stops and reaps the relay (also at
    interpreter exit); killing it outright removes the devices too.

    Args:
        a, b: (namespace, device name); the relay process ends up in b's namespace, so deleting
            that namespace (bench/netns.py kills what runs inside first) also ends it.
        ab, ba: what each direction does (bench/linkmodel.Spec).
        seed: seeds loss and jitter, so a run's drops repeat.
    """

    def __init__(self, a: tuple[str, str], b: tuple[str, str], ab: Spec = NONE, ba: Spec = NONE,
                 seed: int = 0, timeout: float = START_TIMEOUT_S):
        self.a, self.b, self.ab, self.ba = a, b, ab, ba
        self._stderr = tempfile.TemporaryFile()
        self._buffer = b""
        command = [sys.executable, "-m", "bench.tunrelay", "--a", ":".join(a), "--b", ":".join(b),
                   "--ab", json.dumps(dataclasses.asdict(ab)), "--ba", json.dumps(dataclasses.asdict(ba)),
                   "--seed", str(seed), "--max-seconds", str(MAX_LIFETIME_S)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, cwd=ROOT)
        atexit.register(self.close)
        try:
            if (line := self._line(timeout)) != "ready":
                raise TunlinkError(f"relay said {line!r} instead of ready")
        except BaseException:
            self.close()
            raise

    def cut(self) -> None:
        """Drops every frame both ways (and what is queued) until heal(); the devices stay up."""
        self._ask("cut")

    def heal(self) -> None:
        self._ask("heal")

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per direction ("ab", "ba"): offered, delivered, lost, cut, overflow,
        write_errors (packets; *_bytes in bytes), queued now."""
        return json.loads(self._ask("stats"))

    def _ask(self, command: str) -> str:
        if self.proc.poll() is not None:
            raise TunlinkError(f"relay exited {self.proc.returncode}: {self._errors()}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._line(REPLY_TIMEOUT_S)
        if reply.startswith("error"):
            raise TunlinkError(reply)
        return reply

    def _line(self, timeout: float) -> str:
        """The relay's next stdout line, waited for at most timeout seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TunlinkError(f"relay gave no answer within {timeout}s: {self._errors()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.proc.wait(REPLY_TIMEOUT_S)
                raise TunlinkError(f"relay exited {self.proc.returncode}: {self._errors()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def _errors(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-3000:].decode(errors="replace").strip() or "(no stderr)"

    def close(self) -> None:
        """Stops the relay (end of stdin, then SIGTERM, then SIGKILL) and reaps it; the devices
        go with it. Safe to call twice."""
        atexit.unregister(self.close)
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
