"""Shard checkpoints on disk: atomic, checksummed, newest valid one first.

Pure: no gRPC, no threads. One checkpoint is a directory
`<data_dir>/jobs/<job>/shard-<i>/ckpt-<version>-<seq>/` holding each tensor as raw
little-endian bytes (`<name>.bin`, never pickle), each embedding table's tensors
(`table-<i>.<key>.bin`, ckpt_tables.py), a sync shard's pull mirror (`mirror.bin`, with its
setting and version in the manifest; pull_deltas.py) and `manifest.msgpack` (counters, tables, config
and a size + sha256 per file; the manifest carries its own sha256). It is written
into a `.tmp-*` directory (each file fsynced, then the directory), renamed into place (the
commit point) and the parent directory fsynced. Loading walks the committed directories
newest first and takes the first that verifies, logging why it skipped the others.
`.tmp-*` directories are never read; `prune` removes them and all but the newest `keep`
checkpoints and the base (the oldest version: 0, or the version a resumed job started at),
which every rollback can reach.

A checkpoint is input: whoever can write the data dir can also recompute its checksums, which
protect against torn and corrupt writes, not against tampering. So `read` validates all of it
before anything uses it: every field of the manifest (present, of its type, in its range,
no others), the ShardConfig (as InitShard would), the job id, shard index and version against
the directory it lies in, each tensor file (exactly `<name>.bin`, resolved inside the
checkpoint directory, a regular file of the declared size), dtype fp32, shapes against the
shard's length, and finite values; the embedding tables' files against their TableSpecs
(ckpt_tables.py). Identifiers that become paths follow proto/names.py, and
every path is resolved and checked to lie under its root before it is opened or removed.

Crash testing: `SHARDPS_CHECKPOINT_CRASH_AT=POINT[@N]` makes the N-th write (default 1) of
this process exit at once (status 86, like a SIGKILL: nothing flushed, no cleanup) when it
reaches POINT, one of `CRASH_POINTS` (`partial:NAME` exits halfway through NAME's bytes).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import msgpack
import torch
from google.protobuf.message import DecodeError

from shardps.proto import common_pb2, compress, names, ps_pb2

from . import ckpt_tables, paths
from .errors import ShardError
from .pull_deltas import SavedMirror
from .shard_config import validate_config
from .table_config import TableState

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
# Adam's state: all of these or none (before the first step).
ADAM = ("exp_avg", "exp_avg_sq", "step")
MAX_MANIFEST_BYTES = 64 << 20  # far above any real one (tables of a few thousand workers)
MAX_SHARD_INDEX = 2**31 - 1    # ShardConfig.shard_index is an int32
_INT64 = (-(2**63), 2**63 - 1)
_COUNT = (0, 2**63 - 1)
_DIR = re.compile(r"ckpt-([0-9]{12})-([0-9]{4})")      # matched in full, ASCII digits only
_SHARD = re.compile(r"shard-(0|[1-9][0-9]{0,9})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MANIFEST_KEYS = frozenset({
    "format", "byteorder", "job_id", "shard_index", "version", "adam_step", "pushes_applied",
    "job_state", "epoch", "workers", "incarnations", "departed", "clocks", "applied",
    "rollback_id", "config", "files"})
# Present exactly when the config has embedding tables (ckpt_tables.py).
_TABLE_KEYS = frozenset({"tables", "table_applied"})
# Present when the state has a pull mirror: {"setting": str, "version": int}, its tensor
# the file "mirror".
_MIRROR = "mirror"
_FILE_KEYS = frozenset({"file", "size", "sha256", "dtype", "shape"})
_JOB_STATES = frozenset(common_pb2.JobState.values())
_warned: set[str] = set()  # directory entries already logged as ignored


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
    job_state: common_pb2.JobState
    epoch: int
    workers: list[str]
    tensors: dict[str, torch.Tensor]
    incarnations: dict[str, int] = field(default_factory=dict)  # live worker -> incarnation
    departed: dict[str, int] = field(default_factory=dict)      # fenced worker -> incarnation
    clocks: dict[str, int] = field(default_factory=dict)        # worker -> steps pushed
    applied: dict[tuple[str, int], int] = field(default_factory=dict)  # (worker, inc) -> step
    rollback_id: int = 0
    # The embedding tables (TableShard.capture), by name, and the async applied-push table
    # of rows ((worker, table) -> step; ShardTables.applied).
    tables: dict[str, TableState] = field(default_factory=dict)
    table_applied: dict[tuple[str, str], int] = field(default_factory=dict)
    # A sync shard's compressed pulls: the mirror of the copy its workers hold (pull_deltas.py).
    mirror: SavedMirror | None = None

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
    """`<data_dir>/jobs/<job_id>/shard-<index>`, resolved.

    Raises names.InvalidName for a job id that breaks the identifier rule, ValueError for an
    index out of range and paths.PathEscape if the path resolves outside data_dir (a symlink).
    """
    names.check(job_id, "job id")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_SHARD_INDEX:
        raise ValueError(f"shard index must be in [0, {MAX_SHARD_INDEX}], got {index!r}")
    return paths.under(data_dir, "jobs", job_id, f"shard-{index}")


def shard_dirs(data_dir: Path | str) -> list[tuple[str, int, Path]]:
    """(job id, shard index, resolved dir) of every shard directory under data_dir, sorted.

    Entries that are not a valid job id or `shard-<index>`, and directories that resolve
    outside data_dir (symlinks), are left alone (logged once).
    """
    root = Path(data_dir).resolve()
    found: list[tuple[str, int, Path]] = []
    for job in _entries(root / "jobs"):
        if not names.is_valid(job.name):
            _ignore(job, "not a valid job id")
            continue
        for shard in _entries(job):
            m = _SHARD.fullmatch(shard.name)
            if not m or int(m.group(1)) > MAX_SHARD_INDEX:
                continue
            try:
                path = paths.under(root, "jobs", job.name, shard.name)
            except paths.PathEscape:
                _ignore(shard, "resolves outside the data dir")
                continue
            if path.is_dir():
                found.append((job.name, int(m.group(1)), path))
    return found


def _entries(directory: Path) -> list[Path]:
    """A directory's entries, sorted; none if it is not a directory or cannot be listed."""
    try:
        return sorted(directory.iterdir()) if directory.is_dir() else []
    except OSError as exc:
        _ignore(directory, f"cannot be listed ({exc.strerror or type(exc).__name__})")
        return []


def _ignore(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning("%s in the data dir ignored: %s", names.shown(path.name), why)


def committed(directory: Path) -> list[tuple[int, Path]]:
    """(version, path) of every committed checkpoint in a shard directory, newest first.

    Only real directories named `ckpt-<12 digits>-<4 digits>` count (never a symlink).
    """
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if (m := _DIR.fullmatch(path.name)) and _real_dir(path):
            found.append(((int(m.group(1)), int(m.group(2))), path))
    return [(key[0], path) for key, path in sorted(found, reverse=True)]


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


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
    if state.mirror is not None:
        files[_MIRROR] = _write_tensor(tmp / f"{_MIRROR}.bin", state.mirror.tensor, crash, _MIRROR)
    tables = _write_tables(tmp, state, crash)
    body = msgpack.packb(_manifest(state, files, tables), use_bin_type=True)
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


def _write_tables(tmp: Path, state: ShardState, crash: _Crash) -> list[dict]:
    """Writes each table's tensors (ckpt_tables.file_name) in the config's order; returns
    their manifest entries. The crash hook's points are `partial:` and `file:` + the stem."""
    entries = []
    for index, spec in enumerate(state.config.tables):
        table = state.tables[spec.name]
        files = {}
        for key, tensor in table.tensors.items():
            name = ckpt_tables.file_name(index, key)
            files[key] = _write_tensor(tmp / f"{name}.bin", tensor, crash, name)
            crash.at(f"file:{name}")
        entries.append(ckpt_tables.entry(table, files))
    return entries


def _next_name(directory: Path, version: int) -> Path:
    seq = 0
    while (directory / f"ckpt-{version:012d}-{seq:04d}").exists():
        seq += 1
    return directory / f"ckpt-{version:012d}-{seq:04d}"


def _write_tensor(path: Path, tensor: torch.Tensor, crash: _Crash, name: str) -> dict:
    array = tensor.detach().cpu().contiguous().numpy()
    # Flat first: memoryview cannot cast an empty view of more than one dimension (a
    # dynamic table's [0, dim] rows before its first admission).
    data = memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
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


def _manifest(state: ShardState, files: dict, tables: list[dict]) -> dict:
    extra = {"tables": tables, "table_applied": ckpt_tables.applied_entry(state.table_applied)}
    mirror = state.mirror
    return {
        **(extra if state.config.tables else {}),
        **({_MIRROR: {"setting": mirror.setting, "version": mirror.version}} if mirror else {}),
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
    """Removes all but the newest `keep` committed checkpoints and the base (every checkpoint
    of the oldest version: 0, or the version a resumed job started at, the one every rollback
    can reach), and every `.tmp-*` left by an interrupted write. Touches no other names and
    follows no symlinks. Returns what it removed."""
    found = committed(directory)
    base = found[-1][0] if found else None
    removed = [path for v, path in found[max(1, keep):] if v != base]
    if directory.is_dir():
        removed += [p for p in directory.glob(".tmp-*") if _real_dir(p)]
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


@dataclass(frozen=True)
class Expect:
    """What a checkpoint must belong to: its job and shard index (those of the directory it
    was found in) and, with `config`, the same range and layout as that config's."""

    job_id: str
    index: int
    config: ps_pb2.ShardConfig | None = None


def read(path: Path, expect: Expect | None = None) -> ShardState:
    """Reads, verifies and validates one checkpoint directory. Raises CheckpointError naming
    the first thing wrong."""
    body = _read_manifest(path)
    try:
        m = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001  # any undecodable body, whatever the decoder raises
        raise CheckpointError(f"manifest body undecodable ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise CheckpointError("manifest body is not a map")
    if m.get("format") != FORMAT or m.get("byteorder") != "little":
        raise CheckpointError(f"unsupported format {_show(m.get('format'))}")
    missing = sorted(_MANIFEST_KEYS - m.keys())
    if missing:
        raise CheckpointError(f"manifest lacks {', '.join(missing)}")
    extra = [k for k in m if k not in _MANIFEST_KEYS | _TABLE_KEYS | {_MIRROR}]
    if extra:
        raise CheckpointError(f"manifest has unknown field {_show(extra[0])}")
    config = _config(m)
    tables_here = sorted(_TABLE_KEYS & m.keys())
    if config.tables and len(tables_here) != len(_TABLE_KEYS):
        raise CheckpointError(f"manifest lacks {', '.join(sorted(_TABLE_KEYS - m.keys()))}")
    if not config.tables and tables_here:
        raise CheckpointError(f"manifest has {tables_here[0]}, its config has no tables")
    job_id = m["job_id"]
    if not names.is_valid(job_id) or job_id != config.job_id:
        raise CheckpointError(f"job_id {_show(job_id)} is not a valid id equal to the config's")
    index = _int(m, "shard_index", 0, MAX_SHARD_INDEX)
    if index != config.shard_index:
        raise CheckpointError(f"shard_index {index} != the config's {config.shard_index}")
    if expect is not None:
        if (job_id, index) != (expect.job_id, expect.index):
            raise CheckpointError(f"it belongs to job {_show(job_id)} shard {index}, not to the "
                                  f"job {expect.job_id} shard {expect.index} of its directory")
        want = expect.config
        if want is not None and (config.offset, config.length, config.total,
                                 config.layout_fingerprint) != (
                want.offset, want.length, want.total, want.layout_fingerprint):
            raise CheckpointError(
                f"it holds [{config.offset}, {config.offset + config.length}) of "
                f"{config.total} (layout {_show(config.layout_fingerprint)}), the shard "
                f"[{want.offset}, {want.offset + want.length}) of {want.total}")
    version = _int(m, "version", *_COUNT)
    if (name := _DIR.fullmatch(path.name)) and int(name.group(1)) != version:
        raise CheckpointError(f"version {version} != {int(name.group(1))} of its directory name")
    job_state = m["job_state"]
    if type(job_state) is not int or job_state not in _JOB_STATES:
        raise CheckpointError(f"job_state {_show(job_state)} is not a job state")
    mirror = _mirror(path, m, config.length, version)
    tensors = _tensors(path, m["files"], config.length)
    tables, table_applied = _tables(path, m, config)
    return ShardState(
        config=config, version=version, adam_step=_int(m, "adam_step", *_COUNT),
        pushes_applied=_int(m, "pushes_applied", *_COUNT), job_state=cast(common_pb2.JobState, job_state),
        epoch=_int(m, "epoch", *_INT64), workers=_workers(m["workers"]), tensors=tensors,
        incarnations=_table(m, "incarnations", *_INT64), departed=_table(m, "departed", *_INT64),
        clocks=_table(m, "clocks", 0, 2**64 - 1), applied=_applied(m["applied"]),
        rollback_id=_int(m, "rollback_id", *_COUNT), tables=tables, table_applied=table_applied,
        mirror=mirror)


def _read_manifest(path: Path) -> bytes:
    """The verified body of a checkpoint's manifest."""
    try:
        data = _read_file(path, MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise CheckpointError("no manifest") from None
    except CheckpointError as exc:
        raise CheckpointError(f"manifest: {exc}") from None
    try:
        outer = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001  # any undecodable manifest
        raise CheckpointError(f"unreadable manifest ({type(exc).__name__})") from None
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), bytes):
        raise CheckpointError("malformed manifest")
    if hashlib.sha256(outer["body"]).hexdigest() != outer.get("sha256"):
        raise CheckpointError("manifest checksum mismatch")
    return outer["body"]


def _read_file(directory: Path, name: str, limit: int) -> bytes:
    """The bytes of regular file `name`, which must resolve inside `directory` and hold at
    most `limit` bytes. Raises CheckpointError (FileNotFoundError if it is missing)."""
    try:
        path = paths.under(directory, name)
    except paths.PathEscape:
        raise CheckpointError("resolves outside the checkpoint directory") from None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(exc.strerror or type(exc).__name__) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError("not a regular file")
        if info.st_size > limit:
            raise CheckpointError(f"{info.st_size} bytes, more than {limit}")
        try:
            return f.read(limit + 1)
        except OSError as exc:
            raise CheckpointError(exc.strerror or type(exc).__name__) from None


def _config(m: dict) -> ps_pb2.ShardConfig:
    if not isinstance(m["config"], bytes):
        raise CheckpointError("config is not bytes")
    try:
        config = ps_pb2.ShardConfig.FromString(m["config"])
    except DecodeError:
        raise CheckpointError("config is not a ShardConfig") from None
    if not names.is_valid(config.job_id):
        raise CheckpointError(f"config.job_id {_show(config.job_id)} is not a valid job id")
    if config.resume_from_job and not names.is_valid(config.resume_from_job):
        raise CheckpointError(f"config.resume_from_job {_show(config.resume_from_job)} is not "
                              "a valid job id")
    try:
        validate_config(config)
    except ShardError as exc:
        raise CheckpointError(f"config: {exc}") from None
    if config.length > (1 << 62) // 4:
        raise CheckpointError(f"config.length {config.length} is absurd")
    return config


def _mirror(path: Path, m: dict, length: int, version: int) -> SavedMirror | None:
    """The manifest's pull mirror and its file, both or neither."""
    entry, files = m.get(_MIRROR), m["files"]
    in_files = isinstance(files, dict) and _MIRROR in files
    if entry is None and not in_files:
        return None
    if entry is None or not in_files:
        raise CheckpointError(f"{_MIRROR}: its manifest entry and its file go together")
    if not isinstance(entry, dict) or set(entry) != {"setting", "version"}:
        raise CheckpointError(f"{_MIRROR}: entry must have exactly setting, version")
    setting, at = entry["setting"], entry["version"]
    try:
        compress.parse(setting if isinstance(setting, str) else "")
    except ValueError:
        raise CheckpointError(f"{_MIRROR}: setting {_show(setting)} is not a compress setting") from None
    if type(at) is not int or at not in (version - 1, version):
        raise CheckpointError(f"{_MIRROR}: version {_show(at)}, expected {version - 1} or {version}")
    tensor = _read_tensor(path, _MIRROR, files[_MIRROR], [length])
    if not _finite(tensor):
        raise CheckpointError(f"{_MIRROR}: non-finite values")
    return SavedMirror(setting, at, tensor)


def _tensors(path: Path, files: Any, length: int) -> dict[str, torch.Tensor]:
    if not isinstance(files, dict):
        raise CheckpointError("files is not a map")
    unknown = [k for k in files if k not in TENSORS and k != _MIRROR]
    if unknown:
        raise CheckpointError(f"files has unknown tensor {_show(unknown[0])}")
    if "weights" not in files:
        raise CheckpointError("no weights")
    adam = [k for k in ADAM if k in files]
    if adam and len(adam) != len(ADAM):
        raise CheckpointError(f"Adam state incomplete: only {', '.join(adam)}")
    tensors = {}
    for name in TENSORS:
        if name in files:
            shape = [] if name == "step" else [length]
            tensors[name] = _read_tensor(path, name, files[name], shape)
    # What a shard can hold: finite weights, first moment and step count; a second moment
    # that is never negative or NaN (it may overflow to inf on huge gradients).
    bad = [k for k in ("weights", "exp_avg", "step") if k in tensors and not _finite(tensors[k])]
    if bad:
        raise CheckpointError(f"{bad[0]}: non-finite values")
    if "exp_avg_sq" in tensors and not bool((tensors["exp_avg_sq"] >= 0).all()):
        raise CheckpointError("exp_avg_sq: negative or NaN values")
    if "step" in tensors and float(tensors["step"]) < 0:
        raise CheckpointError("step: negative")
    return tensors


def _tables(path: Path, m: dict, config: ps_pb2.ShardConfig,
            ) -> tuple[dict[str, TableState], dict[tuple[str, str], int]]:
    """The tables' states and applied-push table, checked against the config's TableSpecs."""
    if not config.tables:
        return {}, {}
    raw = m["tables"]
    if not isinstance(raw, list) or len(raw) != len(config.tables):
        raise CheckpointError(f"tables is not a list of {len(config.tables)} entries")
    tables = {}
    try:
        for index, (spec, entry) in enumerate(zip(config.tables, raw, strict=True)):
            table, optimizer, want = ckpt_tables.expected(spec, config.shard_index, entry)
            tensors = {key: _read_tensor(path, ckpt_tables.file_name(index, key),
                                         entry["files"][key], shape, dtype)
                       for key, (dtype, shape) in want.items()}
            tables[spec.name] = ckpt_tables.table_state(table, optimizer, entry, tensors)
        applied = ckpt_tables.read_applied(m["table_applied"], list(tables))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return tables, applied


_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def _read_tensor(path: Path, name: str, meta: Any, shape: list[int],
                 dtype: str = "float32") -> torch.Tensor:
    if not isinstance(meta, dict) or set(meta) != _FILE_KEYS:
        raise CheckpointError(f"{name}: file entry must have exactly {', '.join(sorted(_FILE_KEYS))}")
    if meta["file"] != f"{name}.bin":
        raise CheckpointError(f"{name}: file {_show(meta['file'])}, expected {name}.bin")
    if meta["dtype"] != dtype:
        raise CheckpointError(f"{name}: dtype {_show(meta['dtype'])}, expected {dtype}")
    if meta["shape"] != shape or not all(type(d) is int for d in meta["shape"]):
        raise CheckpointError(f"{name}: shape {_show(meta['shape'])}, expected {shape}")
    size = math.prod(shape) * _DTYPES[dtype].itemsize
    if meta["size"] != size or type(meta["size"]) is not int:
        raise CheckpointError(f"{name}: size {_show(meta['size'])}, expected {size}")
    if not isinstance(meta["sha256"], str) or not _SHA256.fullmatch(meta["sha256"]):
        raise CheckpointError(f"{name}: sha256 is not a hex digest")
    try:
        data = _read_file(path, meta["file"], size)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: missing") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: {exc}") from None
    if len(data) != size:
        raise CheckpointError(f"{name}: {len(data)} bytes, manifest says {size} (torn write)")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{name}: checksum mismatch")
    flat = (torch.frombuffer(bytearray(data), dtype=_DTYPES[dtype]) if data
            else torch.empty(0, dtype=_DTYPES[dtype]))
    return flat.reshape(shape)


def _finite(t: torch.Tensor) -> bool:
    return t.numel() == 0 or bool(torch.isfinite(t).all())


def _int(m: dict, key: str, lo: int, hi: int) -> int:
    value = m[key]
    if type(value) is not int or not lo <= value <= hi:
        raise CheckpointError(f"{key} {_show(value)} is not an integer in [{lo}, {hi}]")
    return value


def _worker(value: Any, where: str) -> str:
    # Worker ids never become paths; a table entry must be a bounded string.
    if not isinstance(value, str) or not 0 < len(value) <= names.MAX_LEN:
        raise CheckpointError(f"{where}: worker id {_show(value)} is not a string of 1-"
                              f"{names.MAX_LEN} characters")
    return value


def _workers(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise CheckpointError("workers is not a list")
    workers = [_worker(w, "workers") for w in value]
    if len(set(workers)) != len(workers):
        raise CheckpointError("workers has duplicates")
    return workers


def _table(m: dict, key: str, lo: int, hi: int) -> dict[str, int]:
    value = m[key]
    if not isinstance(value, dict):
        raise CheckpointError(f"{key} is not a map")
    for worker, n in value.items():
        _worker(worker, key)
        if type(n) is not int or not lo <= n <= hi:
            raise CheckpointError(f"{key}: {_show(n)} is not an integer in [{lo}, {hi}]")
    return dict(value)


def _applied(value: Any) -> dict[tuple[str, int], int]:
    if not isinstance(value, list):
        raise CheckpointError("applied is not a list")
    table = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 3 and type(entry[1]) is int
                and type(entry[2]) is int and _INT64[0] <= entry[1] <= _INT64[1]
                and -1 <= entry[2] <= _INT64[1]):
            raise CheckpointError("applied: an entry is not [worker, incarnation, step]")
        table[(_worker(entry[0], "applied"), entry[1])] = entry[2]
    return table


def _show(value: Any) -> str:
    """A manifest value for a message: bounded (names.shown), numbers as they are."""
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, list) and len(value) <= 4 and all(type(v) is int for v in value):
        return repr(value)
    return names.shown(value)


def load(directory: Path, version: int | None = None, at_most: int | None = None,
         expect: Expect | None = None) -> Loaded | None:
    """The newest valid checkpoint in a shard directory, or None if there is none.

    `version` takes only checkpoints of exactly that version, `at_most` only those not newer,
    `expect` only those of that job and shard (see Expect). Every newer candidate that fails
    (read's checks) is logged (a warning naming the reason) and listed in `Loaded.skipped`.
    """
    skipped: list[tuple[Path, str]] = []
    for v, path in committed(directory):
        if (version is not None and v != version) or (at_most is not None and v > at_most):
            continue
        try:
            state = read(path, expect)
        except CheckpointError as exc:
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one",
                        path, exc)
            skipped.append((path, str(exc)))
            continue
        return Loaded(state, path, skipped)
    if skipped:
        log.error("no valid checkpoint left in %s (%d unusable)", directory, len(skipped))
    return None


def versions(directory: Path, expect: Expect | None = None) -> list[int]:
    """Versions of the valid checkpoints in a shard directory, newest first (reads them)."""
    good = []
    for v, path in committed(directory):
        try:
            read(path, expect)
        except CheckpointError:
            continue
        good.append(v)
    return good
