"""The worker's side of a compressed pull (PullRequest.compress): the delta's bytes, checked
and added to the copy it was computed against, exactly as the server added it to its mirror
(server/ps/pull_deltas.py), so the two stay bitwise equal. Errors are codec.CodecError."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch

from shardps.proto import codec, common_pb2, compress, dataplane, ps_pb2
from shardps.psclient.transport import PendingPull


def delta_bytes(head: ps_pb2.PullResponse) -> int:
    """The byte length of a delta reply's encoding, once it is one to read."""
    limit = compress.max_size(head.length)
    if not compress.HEADER.size <= head.compressed_bytes <= limit:
        raise codec.CodecError(f"a pull delta of {head.compressed_bytes} bytes for "
                               f"{head.length} elements (at most {limit})")
    return head.compressed_bytes


def apply_delta(copy: torch.Tensor, data: bytes | memoryview) -> None:
    """copy += decode(data): copy is the flat fp32 slice the delta was computed against."""
    try:
        compress.decode_into(data, copy, add=True)  # checks it all (element count too) first
    except compress.CompressError as exc:
        raise codec.CodecError(f"pull delta: {exc}") from None


def receive_delta(read: Callable[[memoryview], None], size: int, copy: torch.Tensor) -> None:
    """`apply_delta` of a delta of `size` bytes read with read(view), added piece by piece as
    it lands (dataplane.recv_decoding). A bad header is found in the first piece, before
    anything is added; a reply that breaks off later leaves part of it added, which is why
    PulledCopy forgets a shard's tag while its reply is read."""

    def add(body: memoryview, landed: int, done: int) -> int:
        try:
            return compress.decode_landed(body, landed, copy, done, add=True)
        except compress.CompressError as exc:
            raise codec.CodecError(f"pull delta: {exc}") from None

    dataplane.recv_decoding(read, size, add)


class PulledCopy:
    """A PSClient's own copy of the weights its compressed pulls update, and the tag each
    shard's part of it has (PullRequest.held_tag; 0 while unknown). The copy is PSClient's,
    not the caller's, so nothing the caller does to the tensors it pulls into can put the
    two ends out of step. Owned by the PSClient's thread; shards' parts may finish on its
    pool's threads, each touching only its own part and tag."""

    def __init__(self, setting: str, total: int, dtype: int):
        compress.parse(setting)  # raises ValueError naming the setting
        if dtype != common_pb2.DTYPE_FLOAT32:
            raise ValueError(f"compressed pulls ({setting!r}) need the float32 wire dtype")
        self.setting = setting
        self.copy = torch.zeros(total, dtype=torch.float32)
        self._tags: dict[int, int] = {}
        # Fresh per client, so a late reply meant for an earlier client never matches.
        self._next = secrets.randbits(62) | 1

    def carries(self, other: PulledCopy | None) -> bool:
        """Whether this copy can stand in for `other` (a new client's, for the same job's
        new shard map: the same setting and length); its tags go with it, so the shards still
        on their servers go on with deltas and only the moved ones (unknown tags there) pull
        dense."""
        return other is not None and (other.setting, other.copy.numel()) == (self.setting, self.copy.numel())

    def tag(self, request: ps_pb2.PullRequest) -> None:
        """Makes `request` a compressed pull: the setting, the tag of this shard's part, a
        fresh reply tag."""
        request.compress = self.setting
        request.held_tag = self._tags.get(request.shard_index, 0)
        request.reply_tag = self._next
        self._next += 1

    def finish(self, shard: common_pb2.ShardRange, pending: PendingPull,
               dest: torch.Tensor) -> ps_pb2.PullResponse:
        """Reads a reply into this shard's part of the copy, then copies that into dest."""
        part = self.copy[shard.offset : shard.offset + shard.length]
        held = self._tags.pop(shard.index, 0)  # unknown while a reply may be half read
        head = pending.finish(part)
        if not head.ready:  # nothing came, nothing changed on either end
            self._tags[shard.index] = held
            return head
        self._tags[shard.index] = pending.request.reply_tag
        dest.copy_(part)
        return head
