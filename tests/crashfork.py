"""Crash-point tests in one interpreter: a child process imports torch and shardps once, then
forks once per crash point; each fork runs the writes with the checkpoint crash hook armed and
exits at its point (os._exit, leaving the disk as a SIGKILL would). One import of torch for
all points instead of one per point, which was most of these tests' cost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent("""
    import importlib, json, os, signal, sys, time, traceback
    root, target, base, nth, per_point_s = sys.argv[1:6]
    sys.path.insert(0, root)
    from shardps.server.ps import checkpoint
    module, _, name = target.partition(":")
    writes = getattr(importlib.import_module(module), name)
    exits = {}
    for i, point in enumerate(sys.argv[6:]):
        pid = os.fork()
        if pid == 0:
            try:
                os.environ[checkpoint.CRASH_ENV] = f"{point}@{nth}"
                writes(os.path.join(base, str(i)))
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        deadline = time.monotonic() + float(per_point_s)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                exits[point] = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                exits[point] = "timed out"
                break
            time.sleep(0.005)
    print(json.dumps(exits))
""")


def crash_each(points: Sequence[str], writes: str, base: Path, nth: int = 3,
               per_point_s: float = 60.0) -> dict[str, tuple[object, Path]]:
    """Runs `writes` (an importable "module:function" taking a directory) once per point, the
    nth checkpoint write crashing at that point; returns each point's exit code (or "timed
    out") and the directory its writes went to."""
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT), writes, str(base), str(nth), str(per_point_s), *points],
        capture_output=True, text=True, timeout=60 + per_point_s * len(points))
    assert done.returncode == 0, done.stderr[-3000:]
    exits = json.loads(done.stdout.strip().splitlines()[-1])
    return {point: (exits[point], base / str(i)) for i, point in enumerate(points)}
