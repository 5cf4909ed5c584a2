"""Compressed pulls (PullRequest.compress): the server mirrors the copy of a shard each
worker holds and sends only a compressed difference against it.

Per worker: delta = encode(weights - held); held += decode(delta). The worker applies the same
`held += decode(delta)` to its copy, so both stay bitwise equal. What the compressor dropped
stays in `weights - held` and goes out with a later pull: error feedback on the server, with
no residual to keep beyond the mirror itself. Cost: one fp32 copy of the shard per worker.

A mirror is tied to a tag the worker chose for the reply that made it (PullRequest.reply_tag,
fresh for every request); the worker names the tag of the copy it holds (held_tag), and one
that lost or dropped a reply (or is new, or restarted) names another and gets the dense
weights again. Versions would not do: two replies of the same version can differ (one a
delta, one dense, when two pulls of a worker were in flight).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from shardps.proto import common_pb2, compress
from shardps.proto.compress import Compressor


@dataclass(frozen=True)
class PullReply:
    """What goes to the worker: dense fp32 weights (a reset) or a compressed delta."""

    version: int  # the version the worker's copy has after applying this reply
    dense: torch.Tensor | None = None
    delta: bytes | None = None


class HeldCopies:
    """One shard's mirrors of what each worker holds. Not thread-safe: the caller holds the
    shard's lock, as for any read of its weights."""

    def __init__(self, compressor: Compressor):
        self.compressor = compressor
        self._held: dict[str, tuple[int, torch.Tensor]] = {}

    def reply(self, worker: str, held_tag: int, weights: torch.Tensor, reply_tag: int) -> PullReply:
        """The reply that brings a worker whose copy has held_tag to weights, and the mirror
        updated to what the worker will hold, under reply_tag (PullReply.version)."""
        version = reply_tag
        mirror = self._held.get(worker)
        if mirror is None or mirror[0] != held_tag or mirror[1].numel() != weights.numel():
            self._held[worker] = (version, weights.detach().clone())
            return PullReply(version, dense=weights.detach().clone())
        held = mirror[1]
        data = self.compressor.encode_delta(weights.detach(), held)
        self._held[worker] = (version, held)
        return PullReply(version, delta=data)

    def forget(self, worker: str) -> None:
        """Drops a worker's mirror (it left the job); its next pull is dense."""
        self._held.pop(worker, None)

    def forget_except(self, workers: list[str]) -> None:
        """Drops the mirrors of workers not in `workers` (the job's live workers: those
        that left take their copy's memory with them; one that comes back pulls dense)."""
        for worker in [w for w in self._held if w not in workers]:
            del self._held[worker]

    def held_bytes(self) -> int:
        """Memory the mirrors take."""
        return sum(t.numel() * t.element_size() for _, t in self._held.values())


def apply_reply(copy: torch.Tensor | None, reply: PullReply, compressor: Compressor) -> torch.Tensor:
    """The worker's side: its copy after the reply (in place for a delta)."""
    if reply.dense is not None:
        return reply.dense.clone()
    if copy is None or reply.delta is None:
        raise ValueError("a delta reply needs the copy it was computed against")
    compressor.decode_into(reply.delta, copy, add=True)
    return copy


class PullMirrors:
    """Every shard's HeldCopies on one server, per compress setting. A shard's mirrors go
    with the shard object (weak keys): a dropped, replaced or restored shard starts over,
    and its workers' next pulls are dense. Thread-safe to look up; each HeldCopies is used
    under its shard's lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_shard: weakref.WeakKeyDictionary[object, dict[str, HeldCopies]] = \
            weakref.WeakKeyDictionary()

    def copies(self, shard: object, setting: str) -> HeldCopies:
        """The shard's mirrors for `setting` (compress.parse's; raises ValueError if bad)."""
        with self._lock:
            per_setting = self._by_shard.setdefault(shard, {})
            held = per_setting.get(setting)
            if held is None:
                held = per_setting[setting] = HeldCopies(compress.parse(setting))
            return held


def check_request(setting: str, dtype: int, worker_id: str, reply_tag: int) -> None:
    """Raises ValueError unless a compressed pull can be served: a valid setting, fp32 (the
    mirror is what the worker holds, bit for bit), a worker id to mirror for, a reply tag."""
    compress.parse(setting)
    if reply_tag == 0:
        raise ValueError(f"compress {setting!r}: a compressed pull needs a reply_tag")
    if dtype != common_pb2.DTYPE_FLOAT32:
        raise ValueError(f"compress {setting!r}: a compressed pull must ask for FLOAT32")
    if not worker_id:
        raise ValueError(f"compress {setting!r}: a compressed pull needs a worker_id")
