"""Tampered checkpoints: ways to change a committed checkpoint with every checksum recomputed,
so that only validation can tell (tests/unit/test_ps_checkpoint.py, tests/e2e/test_hostile_paths.py).

`TAMPERINGS` maps a case name to (tamper(ckpt_dir, outside_dir), part of the reason the
server must log). A tamper function may leave files in `outside_dir`, a directory outside
the data dir, to point the checkpoint at.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from shardps.proto import ps_pb2
from shardps.server.ps import checkpoint


def read_body(ckpt: Path) -> dict:
    outer = msgpack.unpackb((ckpt / checkpoint.MANIFEST).read_bytes(), raw=False)
    return msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)


def write_body(ckpt: Path, body: Any) -> None:
    """Writes a manifest with this body and its recomputed checksum."""
    packed = msgpack.packb(body, use_bin_type=True)
    (ckpt / checkpoint.MANIFEST).write_bytes(msgpack.packb(
        {"body": packed, "sha256": hashlib.sha256(packed).hexdigest()}, use_bin_type=True))


def edit(fn: Callable[[dict], Any]) -> Callable[[Path, Path], None]:
    """A tampering that changes the manifest body in place (or returns a new one)."""
    def tamper(ckpt: Path, outside: Path) -> None:
        body = read_body(ckpt)
        new = fn(body)
        write_body(ckpt, body if new is None else new)
    return tamper


def edit_config(fn: Callable[[ps_pb2.ShardConfig, dict], None]) -> Callable[[Path, Path], None]:
    def change(body: dict) -> None:
        config = ps_pb2.ShardConfig.FromString(body["config"])
        fn(config, body)
        body["config"] = config.SerializeToString()
    return edit(change)


def file_entry(data: bytes, file: str, dtype: str = "float32",
               shape: list[int] | None = None) -> dict:
    return {"file": file, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "dtype": dtype, "shape": shape if shape is not None else [len(data) // 4]}


def replace_tensor(name: str, make: Callable[[bytes], tuple[bytes, dict]]) -> Callable[[Path, Path], None]:
    """Rewrites tensor `name`'s file and its manifest entry (size, checksum recomputed):
    make(old bytes) -> (new bytes, entry overrides)."""
    def tamper(ckpt: Path, outside: Path) -> None:
        body = read_body(ckpt)
        data, overrides = make((ckpt / f"{name}.bin").read_bytes())
        (ckpt / f"{name}.bin").write_bytes(data)
        body["files"][name] = {**file_entry(data, f"{name}.bin"), **overrides}
        write_body(ckpt, body)
    return tamper


def floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def point_weights_outside(relative: bool) -> Callable[[Path, Path], None]:
    """The weights entry names a file outside the checkpoint, with the right size and sha."""
    def tamper(ckpt: Path, outside: Path) -> None:
        body = read_body(ckpt)
        data = floats([7.0] * (len((ckpt / "weights.bin").read_bytes()) // 4))
        target = outside / f"planted-{ckpt.parent.parent.name}.bin"
        target.write_bytes(data)
        file = os.path.relpath(target, ckpt) if relative else str(target)
        body["files"]["weights"] = file_entry(data, file)
        write_body(ckpt, body)
    return tamper


def symlink_weights_outside(ckpt: Path, outside: Path) -> None:
    """weights.bin becomes a symlink to an identical file outside (manifest unchanged)."""
    target = outside / f"linked-{ckpt.parent.parent.name}.bin"
    target.write_bytes((ckpt / "weights.bin").read_bytes())
    (ckpt / "weights.bin").unlink()
    os.symlink(target, ckpt / "weights.bin")


def _pop(key: str) -> Callable[[dict], None]:
    def change(body: dict) -> None:
        del body[key]
    return change


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda body: body.__setitem__(key, value)


def _escape_job(config: ps_pb2.ShardConfig, body: dict) -> None:
    config.job_id = body["job_id"] = "../../escaped"


def _other_job(config: ps_pb2.ShardConfig, body: dict) -> None:
    config.job_id = body["job_id"] = "someotherjob"


def _other_index(config: ps_pb2.ShardConfig, body: dict) -> None:
    config.shard_index = body["shard_index"] = 1


def _longer(config: ps_pb2.ShardConfig, body: dict) -> None:
    config.length += 1
    config.total += 1


def _bad_lr(config: ps_pb2.ShardConfig, body: dict) -> None:
    config.optimizer.lr = -1.0


def _bad_mode(config: ps_pb2.ShardConfig, body: dict) -> None:
    config.mode = 42  # type: ignore[assignment]


def _extra_entry_key(body: dict) -> None:
    body["files"]["weights"]["mtime"] = 1


def _bad_sha(body: dict) -> None:
    body["files"]["weights"]["sha256"] = "zz"


def _evil_tensor(body: dict) -> None:
    body["files"]["evil"] = dict(body["files"]["weights"])


def _drop_exp_avg_sq(body: dict) -> None:
    del body["files"]["exp_avg_sq"]


def _as_float64(old: bytes) -> tuple[bytes, dict]:
    values = struct.unpack(f"<{len(old) // 4}f", old)
    return struct.pack(f"<{len(values)}d", *values), {"dtype": "float64", "shape": [len(values)]}


def _with_nan(old: bytes) -> tuple[bytes, dict]:
    return struct.pack("<f", math.nan) + old[4:], {}


def _negative(old: bytes) -> tuple[bytes, dict]:
    return floats([-1.0] * (len(old) // 4)), {}


# case -> (tamper(ckpt, outside), what the log line must say)
TAMPERINGS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "missing_version": (edit(_pop("version")), "manifest lacks version"),
    "missing_files": (edit(_pop("files")), "manifest lacks files"),
    "unknown_field": (edit(_set("evil", 1)), "unknown field 'evil'"),
    "body_not_a_map": (edit(lambda body: [1, 2, 3]), "manifest body is not a map"),
    "format_2": (edit(_set("format", 2)), "unsupported format 2"),
    "config_garbage": (edit(_set("config", b"\xff\xff\xff")), "config is not a ShardConfig"),
    "config_not_bytes": (edit(_set("config", 5)), "config is not bytes"),
    "version_negative": (edit(_set("version", -7)), "version -7 is not an integer"),
    "version_huge": (edit(_set("version", 2**64 - 1)), f"version {2**64 - 1} is not an integer"),
    "version_not_its_directory": (edit(_set("version", 1)), "of its directory name"),
    "adam_step_a_string": (edit(_set("adam_step", "3")), "adam_step '3' is not an integer"),
    "epoch_a_float": (edit(_set("epoch", 1.5)), "epoch 1.5 is not an integer"),
    "job_state_99": (edit(_set("job_state", 99)), "job_state 99 is not a job state"),
    "workers_not_a_list": (edit(_set("workers", 5)), "workers is not a list"),
    "workers_of_ints": (edit(_set("workers", [1, 2])), "workers: worker id 1"),
    "incarnations_of_strings": (edit(_set("incarnations", {"worker-a": "x"})), "incarnations: 'x'"),
    "clocks_negative": (edit(_set("clocks", {"worker-a": -1})), "clocks: -1"),
    "applied_malformed": (edit(_set("applied", [["worker-a", "x", 1]])), "applied: an entry"),
    "job_escapes_the_data_dir": (edit_config(_escape_job),
                                 "config.job_id '../../escaped' is not a valid job id"),
    "job_of_another_directory": (edit_config(_other_job), "belongs to job 'someotherjob'"),
    "shard_of_another_directory": (edit_config(_other_index), "shard 1, not to the job"),
    "config_longer_than_weights": (edit_config(_longer), "weights: shape"),
    "config_lr_negative": (edit_config(_bad_lr), "config: optimizer.lr must be in (0, "),
    "config_mode_42": (edit_config(_bad_mode), "config: unknown consistency mode 42"),
    "file_entry_extra_key": (edit(_extra_entry_key), "weights: file entry must have exactly"),
    "sha_not_hex": (edit(_bad_sha), "weights: sha256 is not a hex digest"),
    "unknown_tensor": (edit(_evil_tensor), "unknown tensor 'evil'"),
    "adam_state_incomplete": (edit(_drop_exp_avg_sq), "Adam state incomplete"),
    "weights_absolute_path": (point_weights_outside(relative=False), "weights: file '/"),
    "weights_dotdot_path": (point_weights_outside(relative=True), "weights: file '../"),
    "weights_symlink_outside": (symlink_weights_outside,
                                "weights: resolves outside the checkpoint directory"),
    "weights_float64": (replace_tensor("weights", _as_float64), "weights: dtype 'float64'"),
    "weights_absurd_shape": (replace_tensor("weights", lambda old: (old, {"shape": [2**40]})),
                             f"weights: shape [{2**40}]"),
    "weights_nan": (replace_tensor("weights", _with_nan), "weights: non-finite values"),
    "exp_avg_of_3": (replace_tensor("exp_avg", lambda old: (floats([1.0, 2.0, 3.0]), {})),
                     "exp_avg: shape [3]"),
    "exp_avg_sq_negative": (replace_tensor("exp_avg_sq", _negative),
                            "exp_avg_sq: negative or NaN values"),
    "step_of_5": (replace_tensor("step", lambda old: (floats([1.0] * 5), {})), "step: shape [5]"),
}
