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


class _State:
    """One state of a worker's copy of a shard, never changed in place: workers whose copies
    are in the same state share it (in sync every worker pulls the same versions), and the
    delta that took one worker from it to a version serves the others."""

    __slots__ = ("tensor", "_next", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        # (version, delta, the state it leads to): weak, so a state no worker holds goes
        self._next: tuple[int, bytes, weakref.ref[_State]] | None = None

    def step(self, version: int) -> tuple[bytes, _State] | None:
        """The delta from this state to the weights of `version` and where it leads, if a
        worker took it and someone still holds the state it leads to."""
        if self._next is None or self._next[0] != version:
            return None
        after = self._next[2]()
        return None if after is None else (self._next[1], after)

    def took(self, version: int, delta: bytes, after: _State) -> None:
        self._next = (version, delta, weakref.ref(after))


class HeldCopies:
    """One shard's mirrors of what each worker holds. Not thread-safe: the caller holds the
    shard's lock, as for any read of its weights.

    Given the weights' version, workers at the same state share its mirror and its delta to
    that version: a sync job's N workers cost one encode and one or two mirrors per round,
    not N. Without one (version None) each worker's mirror is its own."""

    def __init__(self, compressor: Compressor):
        self.compressor = compressor
        self._held: dict[str, tuple[int, _State]] = {}
        self._dense: tuple[int, weakref.ref[_State]] | None = None  # the last dense reply's state

    def reply(self, worker: str, held_tag: int, weights: torch.Tensor, reply_tag: int,
              version: int | None = None) -> PullReply:
        """The reply that brings a worker whose copy has held_tag to weights (of `version`),
        and the mirror updated to what the worker will hold, under reply_tag
        (PullReply.version)."""
        mirror = self._held.get(worker)
        if mirror is None or mirror[0] != held_tag or mirror[1].tensor.numel() != weights.numel():
            state = self._dense_state(weights, version)
            self._held[worker] = (reply_tag, state)
            return PullReply(reply_tag, dense=state.tensor)
        taken = None if version is None else mirror[1].step(version)
        if taken is None:
            after = _State(torch.empty_like(mirror[1].tensor))
            data = self.compressor.encode_delta(weights.detach(), mirror[1].tensor, out=after.tensor)
            if version is not None:
                mirror[1].took(version, data, after)
            taken = (data, after)
        self._held[worker] = (reply_tag, taken[1])
        return PullReply(reply_tag, delta=taken[0])

    def _dense_state(self, weights: torch.Tensor, version: int | None) -> _State:
        if version is not None and self._dense is not None and self._dense[0] == version:
            state = self._dense[1]()
            if state is not None and state.tensor.numel() == weights.numel():
                return state
        state = _State(weights.detach().clone())
        if version is not None:
            self._dense = (version, weakref.ref(state))
        return state

    def forget(self, worker: str) -> None:
        """Drops a worker's mirror (it left the job); its next pull is dense."""
        self._held.pop(worker, None)

    def forget_except(self, workers: list[str]) -> None:
        """Drops the mirrors of workers not in `workers` (the job's live workers: those
        that left take their copy's memory with them; one that comes back pulls dense)."""
        for worker in [w for w in self._held if w not in workers]:
            del self._held[worker]

    def held(self, worker: str) -> torch.Tensor | None:
        """The mirror of a worker's copy (read only), or None."""
        mirror = self._held.get(worker)
        return None if mirror is None else mirror[1].tensor

    def held_bytes(self) -> int:
        """Memory the mirrors take (a state shared by several workers counted once). Safe to
        call without the shard's lock (a metrics scrape): it reads a copy of the table."""
        states = {id(state): state.tensor for _, state in list(self._held.values())}
        return sum(t.numel() * t.element_size() for t in states.values())


def apply_reply(copy: torch.Tensor | None, reply: PullReply, compressor: Compressor) -> torch.Tensor:
    """The worker's side: its copy after the reply (in place for a delta)."""
    if reply.dense is not None:
        return reply.dense.clone()  # the server's mirror: never changed in place, but its own
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

    def held_bytes(self, shard: object) -> int:
        """Bytes of a shard's mirrors, every setting's (0 for none)."""
        with self._lock:
            held = list(self._by_shard.get(shard, {}).values())
        return sum(h.held_bytes() for h in held)

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
