"""Shard checkpoints on disk: atomic, checksummed, newest valid one first.

Pure: no gRPC, no threads. One checkpoint is a directory
`<data_dir>/jobs/<job>/shard-<i>/ckpt-<version>-<seq>/` holding each tensor as raw
little-endian bytes (`<name>.bin`, never pickle) and `manifest.msgpack` (counters, tables,
config and a size + sha256 per file; the manifest carries its own sha256). It is written
into a `.tmp-*` directory (each file fsynced, then the directory), renamed into place (the
commit point) and the parent directory fsynced. Loading walks the committed directories
newest first and takes the first whose manifest and every checksum verify, logging why it
skipped the others. `.tmp-*` directories are never read; `prune` removes them and all but
the newest `keep` checkpoints.

Crash testing: `SHARDPS_CHECKPOINT_CRASH_AT=POINT[@N]` makes the N-th write (default 1) of
this process exit at once (status 86, like a SIGKILL: nothing flushed, no cleanup) when it
reaches POINT, one of `CRASH_POINTS` (`partial:NAME` exits halfway through NAME's bytes).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch

from shardps.proto import ps_pb2

log = logging.getLogger("shardps.ps")

FORMAT = 1
MANIFEST = "manifest.msgpack"
CRASH_ENV = "SHARDPS_CHECKPOINT_CRASH_AT"
CRASH_EXIT = 86
# The tensors of a shard's state, in the order they are written.
TENSORS = ("weights", "exp_avg", "exp_avg_sq", "step")
# Every point of a write at which the crash hook can fire, in order.
CRASH_POINTS = (
    "tmp_dir",                                        # temp dir created, empty
    *(f"partial:{name}" for name in TENSORS),         # half of a tensor file written
    *(f"file:{name}" for name in TENSORS),            # a tensor file written and fsynced
    "manifest",                                       # manifest written and fsynced
    "tmp_synced",                                     # temp dir fsynced
    "renamed",                                        # renamed into place (committed)
    "parent_synced",                                  # parent dir fsynced
    "pruned",                                         # old checkpoints removed
)
_DIR = re.compile(r"^ckpt-(\d{12})-(\d{4})$")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


class CheckpointError(Exception):
    """A checkpoint that cannot be used: torn, corrupt, or of another format."""


@dataclass
class ShardState:
    """Everything a shard needs to continue exactly where it was (Shard.capture / load_state).

    Tensors are CPU copies owned by this object: `weights` always, the Adam state (`exp_avg`,
    `exp_avg_sq`, `step`) once the first step has run.
    """

    config: ps_pb2.ShardConfig
    version: int
    adam_step: int
    pushes_applied: int
    job_state: int
    epoch: int
    workers: list[str]
    tensors: dict[str, torch.Tensor]
    incarnations: dict[str, int] = field(default_factory=dict)  # live worker -> incarnation
    departed: dict[str, int] = field(default_factory=dict)      # fenced worker -> incarnation
    clocks: dict[str, int] = field(default_factory=dict)        # worker -> steps pushed
    applied: dict[tuple[str, int], int] = field(default_factory=dict)  # (worker, inc) -> step
    rollback_id: int = 0

    @property
    def job_id(self) -> str:
        return self.config.job_id

    @property
    def index(self) -> int:
        return self.config.shard_index


@dataclass(frozen=True)
class Loaded:
    """A verified checkpoint and the newer ones that were skipped, with the reasons."""

    state: ShardState
    path: Path
    skipped: list[tuple[Path, str]]


def shard_dir(data_dir: Path | str, job_id: str, index: int) -> Path:
    return Path(data_dir) / "jobs" / job_id / f"shard-{index}"


def shard_dirs(data_dir: Path | str) -> list[tuple[str, int, Path]]:
    """(job id, shard index, dir) of every shard directory under data_dir, sorted."""
    jobs = Path(data_dir) / "jobs"
    found = []
    if jobs.is_dir():
        for job in sorted(jobs.iterdir()):
            for shard in sorted(job.glob("shard-*")):
                index = shard.name.removeprefix("shard-")
                if index.isdigit() and shard.is_dir():
                    found.append((job.name, int(index), shard))
    return found


def committed(directory: Path) -> list[tuple[int, Path]]:
    """(version, path) of every committed checkpoint in a shard directory, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if m := _DIR.match(path.name):
            found.append(((int(m.group(1)), int(m.group(2))), path))
    return [(key[0], path) for key, path in sorted(found, reverse=True)]


# -- write ------------------------------------------------------------------------------------


class _Crash:
    """The crash hook of this process (see the module docstring)."""

    writes = 0

    def __init__(self) -> None:
        point, _, nth = os.environ.get(CRASH_ENV, "").partition("@")
        self.point = point
        self.nth = int(nth) if nth.isdigit() else 1
        _Crash.writes += 1
        self.armed = bool(point) and _Crash.writes == self.nth

    def at(self, point: str) -> None:
        if self.armed and point == self.point:
            os._exit(CRASH_EXIT)


def write(directory: Path | str, state: ShardState, keep: int) -> Path:
    """Writes `state` as a new checkpoint under `directory` and prunes to `keep`.

    Returns the committed checkpoint's path. Raises OSError (disk full, permissions); a
    failed write leaves only a `.tmp-*` directory, which the next prune removes.
    """
    crash = _Crash()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{state.version}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    crash.at("tmp_dir")
    files = {}
    for name in TENSORS:
        tensor = state.tensors.get(name)
        if tensor is None:
            continue
        files[name] = _write_tensor(tmp / f"{name}.bin", tensor, crash, name)
        crash.at(f"file:{name}")
    body = msgpack.packb(_manifest(state, files), use_bin_type=True)
    _write_file(tmp / MANIFEST, msgpack.packb(
        {"body": body, "sha256": hashlib.sha256(body).hexdigest()}, use_bin_type=True))
    crash.at("manifest")
    fsync_dir(tmp)
    crash.at("tmp_synced")
    final = _next_name(directory, state.version)
    os.rename(tmp, final)
    crash.at("renamed")
    fsync_dir(directory)
    crash.at("parent_synced")
    prune(directory, keep)
    crash.at("pruned")
    return final


def _next_name(directory: Path, version: int) -> Path:
    seq = 0
    while (directory / f"ckpt-{version:012d}-{seq:04d}").exists():
        seq += 1
    return directory / f"ckpt-{version:012d}-{seq:04d}"


def _write_tensor(path: Path, tensor: torch.Tensor, crash: _Crash, name: str) -> dict:
    array = tensor.detach().cpu().contiguous().numpy()
    data = memoryview(array).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    digest = hashlib.sha256(data).hexdigest()
    with open(path, "xb") as f:
        if crash.armed and crash.point == f"partial:{name}":
            f.write(data[: len(data) // 2])
            f.flush()
            crash.at(f"partial:{name}")
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "size": len(data), "sha256": digest,
            "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Makes a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest(state: ShardState, files: dict) -> dict:
    return {
        "format": FORMAT,
        "byteorder": "little",
        "job_id": state.job_id,
        "shard_index": state.index,
        "version": state.version,
        "adam_step": state.adam_step,
        "pushes_applied": state.pushes_applied,
        "job_state": state.job_state,
        "epoch": state.epoch,
        "workers": list(state.workers),
        "incarnations": dict(state.incarnations),
        "departed": dict(state.departed),
        "clocks": dict(state.clocks),
        "applied": [[w, inc, step] for (w, inc), step in sorted(state.applied.items())],
        "rollback_id": state.rollback_id,
        "config": state.config.SerializeToString(),
        "files": files,
    }


def prune(directory: Path, keep: int) -> list[Path]:
    """Removes all but the newest `keep` committed checkpoints, and every `.tmp-*` left by
    an interrupted write. Touches no other names. Returns what it removed."""
    removed = [path for _, path in committed(directory)[max(1, keep):]]
    removed += [p for p in directory.glob(".tmp-*") if p.is_dir()] if directory.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def drop_newer(directory: Path, version: int) -> list[Path]:
    """Removes the checkpoints newer than `version` (a rollback abandons their timeline)."""
    removed = [path for v, path in committed(directory) if v > version]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# -- read -------------------------------------------------------------------------------------


def read(path: Path) -> ShardState:
    """Reads and verifies one checkpoint directory. Raises CheckpointError."""
    try:
        outer = msgpack.unpackb((path / MANIFEST).read_bytes(), raw=False)
    except FileNotFoundError:
        raise CheckpointError("no manifest") from None
    except (OSError, ValueError, msgpack.UnpackException) as exc:
        raise CheckpointError(f"unreadable manifest ({exc})") from None
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), bytes):
        raise CheckpointError("malformed manifest")
    if hashlib.sha256(outer["body"]).hexdigest() != outer.get("sha256"):
        raise CheckpointError("manifest checksum mismatch")
    m = msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)
    if m.get("format") != FORMAT or m.get("byteorder") != "little":
        raise CheckpointError(f"unsupported format {m.get('format')!r}")
    tensors = {name: _read_tensor(path, name, meta) for name, meta in m["files"].items()}
    if "weights" not in tensors:
        raise CheckpointError("no weights")
    config = ps_pb2.ShardConfig.FromString(m["config"])
    return ShardState(
        config=config, version=m["version"], adam_step=m["adam_step"],
        pushes_applied=m["pushes_applied"], job_state=m["job_state"], epoch=m["epoch"],
        workers=list(m["workers"]), tensors=tensors, incarnations=dict(m["incarnations"]),
        departed=dict(m["departed"]), clocks=dict(m["clocks"]),
        applied={(w, inc): step for w, inc, step in m["applied"]},
        rollback_id=m["rollback_id"])


def _read_tensor(path: Path, name: str, meta: dict) -> torch.Tensor:
    try:
        data = (path / meta["file"]).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{name}: {exc.strerror or exc}") from None
    if len(data) != meta["size"]:
        raise CheckpointError(f"{name}: {len(data)} bytes, manifest says {meta['size']} "
                              "(torn write)")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{name}: checksum mismatch")
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise CheckpointError(f"{name}: unknown dtype {meta['dtype']!r}")
    flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return flat.reshape(meta["shape"])


def load(directory: Path, version: int | None = None, at_most: int | None = None) -> Loaded | None:
    """The newest valid checkpoint in a shard directory, or None if there is none.

    `version` takes only checkpoints of exactly that version, `at_most` only those not newer.
    Every newer candidate that fails verification is logged (a warning naming the reason)
    and listed in `Loaded.skipped`.
    """
    skipped: list[tuple[Path, str]] = []
    for v, path in committed(directory):
        if (version is not None and v != version) or (at_most is not None and v > at_most):
            continue
        try:
            state = read(path)
        except CheckpointError as exc:
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one",
                        path, exc)
            skipped.append((path, str(exc)))
            continue
        return Loaded(state, path, skipped)
    if skipped:
        log.error("no valid checkpoint left in %s (%d unusable)", directory, len(skipped))
    return None


def versions(directory: Path) -> list[int]:
    """Versions of the valid checkpoints in a shard directory, newest first (reads them)."""
    good = []
    for v, path in committed(directory):
        try:
            read(path)
        except CheckpointError:
            continue
        good.append(v)
    return good
