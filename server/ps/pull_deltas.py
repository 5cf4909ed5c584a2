"""Compressed pulls (issue 15, not yet wired): the server mirrors the copy of a shard each
worker holds and sends only a compressed difference against it.

Per worker: delta = encode(weights - held); held += decode(delta). The worker applies the same
`held += decode(delta)` to its copy, so both stay bitwise equal. What the compressor dropped
stays in `weights - held` and goes out with a later pull: error feedback on the server, with
no residual to keep beyond the mirror itself. Cost: one fp32 copy of the shard per worker.

A mirror is tied to the version the worker says its copy is; a worker that lost a reply (or
is new, or restarted) names another version and gets the dense weights again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def reply(self, worker: str, worker_version: int, weights: torch.Tensor, version: int) -> PullReply:
        """The reply that brings a worker whose copy is at worker_version to weights (at
        version), and the mirror updated to what the worker will hold."""
        mirror = self._held.get(worker)
        if mirror is None or mirror[0] != worker_version or mirror[1].numel() != weights.numel():
            self._held[worker] = (version, weights.detach().clone())
            return PullReply(version, dense=weights.detach().clone())
        held = mirror[1]
        data = self.compressor.encode(weights.detach() - held)
        held.add_(self.compressor.decode(data))
        self._held[worker] = (version, held)
        return PullReply(version, delta=data)

    def forget(self, worker: str) -> None:
        """Drops a worker's mirror (it left the job); its next pull is dense."""
        self._held.pop(worker, None)

    def held_bytes(self) -> int:
        """Memory the mirrors take."""
        return sum(t.numel() * t.element_size() for _, t in self._held.values())


def apply_reply(copy: torch.Tensor | None, reply: PullReply, compressor: Compressor) -> torch.Tensor:
    """The worker's side: its copy after the reply (in place for a delta)."""
    if reply.dense is not None:
        return reply.dense.clone()
    if copy is None or reply.delta is None:
        raise ValueError("a delta reply needs the copy it was computed against")
    return copy.add_(compressor.decode(reply.delta))
