"""Child processes of the benches: standalone `shardps-server`s and the baseline peers, started
by client/launcher.py (addresses from their first lines, a clean stop), with their resident
memory from /proc."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from shardps.client import launcher
from shardps.proto import common_pb2


class Child(launcher.Daemon):
    """A process that prints `listening on HOST:PORT` (a console script, or a module with a
    main()), started and waited for; its other output is kept (last 200 lines)."""

    def __init__(self, program: str, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 timeout: float = 120.0, prefix: Sequence[str] = ()):
        super().__init__(program, program, args, env=env, keep_lines=200, prefix=prefix)
        self.wait_ready(timeout)

    def rss_bytes(self) -> int:
        """Resident set size now (VmRSS)."""
        return _status_kib(self.pid, "VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """Largest resident set size so far (VmHWM)."""
        return _status_kib(self.pid, "VmHWM") * 1024


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def start_servers(count: int, threads: int = 1, metrics: bool = False,
                  env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> list[Child]:
    """`count` standalone parameter servers (`--coordinator ''`), started in parallel."""
    args = ["--coordinator", "", "--port", "0",
            "--threads", str(threads), "--log-level", "WARNING",
            "--metrics-port", "0" if metrics else "-1", *extra]
    children: list[Child] = []
    errors: list[Exception] = []

    def one() -> None:
        try:
            children.append(Child("shardps-server", args, env))
        except Exception as exc:  # noqa: BLE001 - reported below, after the others started
            errors.append(exc)

    threads_ = [threading.Thread(target=one) for _ in range(count)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    if errors:
        stop_all(children)
        raise errors[0]
    return children


def stop_all(children: Sequence[Child]) -> None:
    for child in children:
        child.stop()


def shard_map(addresses: Sequence[str], total: int) -> common_pb2.ShardMap:
    """[0, total) split into one contiguous range per server, as the coordinator splits it."""
    ranges, start = [], 0
    for i, address in enumerate(addresses):
        end = total * (i + 1) // len(addresses)
        ranges.append(common_pb2.ShardRange(index=i, server_id=f"server-{i}", address=address,
                                            offset=start, length=end - start))
        start = end
    return common_pb2.ShardMap(version=1, shards=ranges)


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
