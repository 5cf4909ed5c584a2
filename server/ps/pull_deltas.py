"""Compressed pulls (PullRequest.compress): the server mirrors the copy of a shard each
worker holds and sends only a compressed difference against it.

Per worker: delta = encode(weights - held); held += decode(delta). The worker applies the same
`held += decode(delta)` to its copy, so both stay bitwise equal. What the compressor dropped
stays in `weights - held` and goes out with a later pull: error feedback on the server, with
no residual to keep beyond the mirror itself. Cost: one fp32 copy of the shard per worker.

A mirror is tied to a tag the worker chose for the reply that made it (PullRequest.reply_tag,
fresh for every request); the worker names the tag of the copy it holds (held_tag), and one
that lost or dropped a reply (or is new, or restarted) names another and gets a dense copy
again: the weights, or in a sync job the copy its peers hold (`HeldCopies._reset`). Versions
would not do: two replies of the same version can differ (one a delta, one dense, when two
pulls of a worker were in flight).

Checkpoints carry the mirror the workers of a sync job hold (`ShardMirrors.saved_locked`),
so that after a rollback or a restart their dense reset is that copy, brought to the
restored version as the straight run's delta brought it, instead of the weights: the
replayed steps are then computed on bitwise the weights the workers had (docs/network.md,
"Compressed pulls").
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from shardps.proto import common_pb2, compress
from shardps.proto.compress import Compressor

SPARES = 2  # storages of states no longer held, kept per HeldCopies for the next ones


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

    __slots__ = ("tensor", "version", "_next", "__weakref__")

    def __init__(self, tensor: torch.Tensor, version: int | None):
        self.tensor = tensor
        self.version = version  # of the weights it mirrors (None: the caller named none)
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
    not N. Without one (version None) each worker's mirror is its own.

    `sync` (a sync shard's): every worker is to hold one copy per version, the one the
    workers that pulled each version once hold. So a worker without a copy is sent that copy
    (`_reset`), and one that asks again for the version its copy has gets it again. Else a
    reset sends the weights, and a repeated pull the delta still owed (the copy converges
    to the weights)."""

    def __init__(self, compressor: Compressor, sync: bool = False):
        self.compressor = compressor
        self.sync = sync
        self._held: dict[str, tuple[int, _State]] = {}
        self._dense: tuple[int, weakref.ref[_State]] | None = None  # the last dense reply's state
        self._restored: _State | None = None  # a checkpoint's mirror (`seed`), until used
        self._spares: list[torch.UntypedStorage] = []  # see _buffer

    def reply(self, worker: str, held_tag: int, weights: torch.Tensor, reply_tag: int,
              version: int | None = None) -> PullReply:
        """The reply that brings a worker whose copy has held_tag to weights (of `version`),
        and the mirror updated to what the worker will hold, under reply_tag
        (PullReply.version)."""
        mirror = self._held.get(worker)
        if mirror is None or mirror[0] != held_tag or mirror[1].tensor.numel() != weights.numel():
            state = self._reset(weights, version)
            self._held[worker] = (reply_tag, state)
            return PullReply(reply_tag, dense=state.tensor)
        if self.sync and version is not None and mirror[1].version == version:
            # Its copy is of this version already (a retried or repeated pull, a resync after
            # a rollback): that copy again, not a delta towards the weights, which would take
            # it off the course a worker pulling each version once follows.
            self._held[worker] = (reply_tag, mirror[1])
            return PullReply(reply_tag, dense=mirror[1].tensor)
        data, after = self._advance(mirror[1], weights, version)
        self._held[worker] = (reply_tag, after)
        return PullReply(reply_tag, delta=data)

    def _advance(self, state: _State, weights: torch.Tensor, version: int | None) -> tuple[bytes, _State]:
        """The delta from `state` to weights (of `version`) and the state it leads to: the
        one another worker took from the same state, if it is still held."""
        taken = None if version is None else state.step(version)
        if taken is None:
            after = _State(self._buffer(state.tensor.numel()), version)
            data = self.compressor.encode_delta(weights.detach(), state.tensor, out=after.tensor)
            if version is not None:
                state.took(version, data, after)
            taken = (data, after)
        return taken

    def _reset(self, weights: torch.Tensor, version: int | None) -> _State:
        """What a worker without a copy is sent (sync): at a version, the copy the other workers
        hold there (or a checkpoint's, `seed`), or the one they hold a version behind,
        brought to it by the delta they take; so a sync round's workers all compute on one
        copy, and a worker that lost its own (a new client) or a restored shard's workers
        go on as the run would have without it. Else (the first pull, or none at that
        version) the weights, one copy for the workers that reset at that version."""
        n = weights.numel()
        if self.sync and version is not None:
            best = self._newest([s for _, s in self._held.values()], version, n)
            if best is not None:
                if best is self._restored:
                    self._restored = None  # the workers' mirrors carry it on from here
                return best if best.version == version else self._advance(best, weights, version)[1]
        if version is not None and self._dense is not None and self._dense[0] == version:
            state = self._dense[1]()
            if state is not None and state.tensor.numel() == n:
                return state
        state = _State(self._buffer(n).copy_(weights.detach()), version)
        if version is not None:
            self._dense = (version, weakref.ref(state))
        return state

    def _buffer(self, n: int) -> torch.Tensor:
        """An uninitialised fp32 tensor of n elements for a new state: the storage of one that
        nobody holds any more (no worker's mirror, no reply in flight: its tensor was freed),
        else a new one. A new 12.5M-element tensor costs ~30 ms of page faults as it is
        first written, as much as the delta's encode itself (68 against 37 ms)."""
        while self._spares:
            storage = self._spares.pop()
            if storage.nbytes() == 4 * n:
                tensor = torch.empty(0, dtype=torch.float32).set_(storage, 0, (n,), (1,))
                break
        else:
            tensor = torch.empty(n, dtype=torch.float32)
        weakref.finalize(tensor, self._recycle, tensor.untyped_storage())
        return tensor

    def _recycle(self, storage: torch.UntypedStorage) -> None:
        """A state's tensor was freed (on whichever thread dropped it: a list's append and pop
        are atomic): keep its storage for the next state."""
        if len(self._spares) < SPARES:
            self._spares.append(storage)

    def seed(self, version: int, tensor: torch.Tensor) -> None:
        """Takes a checkpoint's mirror (of `version`): what workers without a copy are sent
        at that version, or advanced to at the next, instead of the weights."""
        self._restored = _State(tensor, version)

    def saved(self, workers: list[str], version: int, n: int) -> tuple[int, torch.Tensor] | None:
        """A copy of the mirror that `workers` hold at `version` or one before it (`_newest`),
        or None: what a checkpoint of a shard of n elements at `version` keeps."""
        best = self._newest([state for worker, (_, state) in self._held.items() if worker in workers],
                            version, n)
        if best is None:
            return None
        assert best.version is not None
        return best.version, best.tensor.clone()

    def _newest(self, held: list[_State], version: int, n: int) -> _State | None:
        """Of the states in `held` and the seed, of n elements, the one at `version` or else
        at the version before it; of several, the one that most of `held` are."""
        states = [s for s in [*held, self._restored]
                  if s is not None and s.tensor.numel() == n and s.version in (version - 1, version)]
        return max(states, key=lambda s: (s.version, sum(h is s for h in held)), default=None)

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


@dataclass(frozen=True)
class SavedMirror:
    """A checkpoint's mirror: the copy of a sync shard its workers held, at `version` (the
    shard's, or one before it), for pulls compressed with `setting`."""

    setting: str
    version: int
    tensor: torch.Tensor


class ShardMirrors:
    """One shard's HeldCopies, per compress setting (the shard's core holds it; `sync`: the
    shard's mode is). Thread-safe to look up; each HeldCopies, `saved_locked` and
    `restore_locked` under the shard's lock."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self._lock = threading.Lock()
        self._by_setting: dict[str, HeldCopies] = {}

    def held_bytes(self) -> int:
        """Bytes of the mirrors, every setting's (0 for none)."""
        with self._lock:
            held = list(self._by_setting.values())
        return sum(h.held_bytes() for h in held)

    def copies(self, setting: str) -> HeldCopies:
        """The mirrors for `setting` (compress.parse's; raises ValueError if bad)."""
        with self._lock:
            held = self._by_setting.get(setting)
            if held is None:
                held = self._by_setting[setting] = HeldCopies(compress.parse(setting), self.sync)
            return held

    def saved_locked(self, workers: list[str], version: int, n: int) -> SavedMirror | None:
        """The mirror a checkpoint of a sync shard (n elements) at `version` keeps
        (HeldCopies.saved; the first setting that has one: a job pulls with one); None for
        other modes, which never roll back."""
        if not self.sync:
            return None
        with self._lock:
            held = list(self._by_setting.items())
        for setting, copies in held:
            saved = copies.saved(workers, version, n)
            if saved is not None:
                return SavedMirror(setting, *saved)
        return None

    def restore_locked(self, saved: SavedMirror | None) -> None:
        """Drops every mirror (the weights were replaced) and seeds `saved`'s, if any."""
        with self._lock:
            self._by_setting.clear()
        if saved is not None:
            self.copies(saved.setting).seed(saved.version, saved.tensor)


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
