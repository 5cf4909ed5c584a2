"""The shards this server holds, by (job id, shard index), and the coordinator's job views."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from shardps.proto import coordinator_pb2
from shardps.proto.states import MODE_NAMES

from .errors import UnknownShardError
from .shard import Shard

log = logging.getLogger("shardps.ps")


class ShardRegistry:
    """Maps (job_id, shard_index) to live Shards.

    Thread-safe: a lock guards the map only; each Shard has its own lock. A replaced or
    dropped shard is closed, so calls still holding it fail or wake up instead of hanging.
    """

    def __init__(self, on_put: Callable[[Shard], None] | None = None) -> None:
        """`on_put(shard)` runs before a shard is added (the checkpointer attaches there);
        if it raises, nothing is added."""
        self._shards: dict[tuple[str, int], Shard] = {}
        self._lock = threading.Lock()
        self._on_put = on_put

    def put(self, shard: Shard) -> bool:
        """Adds a shard, replacing (and closing) any shard of the same job and index.

        Returns True if one was replaced.
        """
        key = (shard.job_id, shard.index)
        if self._on_put is not None:
            self._on_put(shard)
        with self._lock:
            old = self._shards.get(key)
            self._shards[key] = shard
        if old is not None:
            old.close()
        log.info("job %s shard %d %s: %d elements at offset %d, %s, workers %s", shard.job_id,
                 shard.index, "replaced" if old else "created", shard.length,
                 shard.config.offset, MODE_NAMES[shard.mode], ",".join(shard.workers) or "-")
        return old is not None

    def get(self, job_id: str, index: int) -> Shard:
        """Raises UnknownShardError if this server holds no such shard."""
        with self._lock:
            shard = self._shards.get((job_id, index))
        if shard is None:
            raise UnknownShardError("unknown job or shard")
        return shard

    def shards(self, job_id: str = "") -> list[Shard]:
        """The shards of one job ("" = every job), sorted by job and index."""
        with self._lock:
            items = sorted(self._shards.items())
        return [s for (job, _), s in items if not job_id or job == job_id]

    def drop(self, job_id: str) -> int:
        """Frees every shard of a job; returns how many."""
        with self._lock:
            keys = [k for k in self._shards if k[0] == job_id]
            dropped = [self._shards.pop(k) for k in keys]
        for shard in dropped:
            shard.close()
        if dropped:
            log.info("job %s: dropped %d shard(s)", job_id, len(dropped))
        return len(dropped)

    def drop_shard(self, job_id: str, index: int) -> bool:
        """Frees one shard (a copy the shard map no longer names); returns whether it was
        here. Its checkpoints stay on disk."""
        with self._lock:
            shard = self._shards.pop((job_id, index), None)
        if shard is None:
            return False
        shard.close()
        log.info("job %s shard %d: dropped (no longer a copy here)", job_id, index)
        return True

    def apply_views(self, views: Iterable[coordinator_pb2.ServerJobView]) -> list[Shard]:
        """Applies the coordinator's job states and live worker sets to the matching shards.

        Returns the shards this settled: their job's final weights are now fixed (the caller
        checkpoints them).
        """
        settled = []
        for view in views:
            if not view.job_id:
                continue
            final = view.final_version if view.HasField("final_version") else None
            for shard in self.shards(view.job_id):
                # State first: a final job must not complete a round on its way out.
                was = shard.settled
                shard.set_job_state(view.state, final)
                if shard.settled and not was:
                    settled.append(shard)
                if len(view.live_incarnations) == len(view.live_workers):
                    shard.fence(dict(zip(view.live_workers, view.live_incarnations, strict=True)))
                shard.update_workers(list(view.live_workers), view.epoch)
        return settled

    def frozen(self) -> list[coordinator_pb2.ShardVersion]:
        """sync shards frozen without a named final version, at their version: the
        coordinator names the job's final version from these."""
        return [coordinator_pb2.ShardVersion(job_id=s.job_id, shard_index=s.index,
                                             version=s.version)
                for s in self.shards() if s.frozen and not s.settled]

    def wake_all(self) -> None:
        """Makes every waiting pull re-check whether it was cancelled (shutdown)."""
        for shard in self.shards():
            shard.wake()

    def close(self) -> None:
        """Closes every shard (shutdown): waiting pulls return at once."""
        with self._lock:
            shards = list(self._shards.values())
        for shard in shards:
            shard.close()
