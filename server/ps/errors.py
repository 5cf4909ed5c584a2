"""Failures of the parameter-server core; the servicer maps each to one gRPC status code.

Expected outcomes (duplicate, stale, job done) are `ps_pb2.PushStatus` values, not errors.
Every error is raised before any shard state changes.
"""

from __future__ import annotations


class ShardError(Exception):
    """Base class; `reason` labels the rejection counter (low cardinality)."""

    reason = "invalid"


class UnknownShardError(ShardError):
    """No shard of that job and index lives on this server."""

    reason = "unknown_shard"


class ShardClosedError(ShardError):
    """The shard was dropped or replaced while the call was using it."""

    reason = "shard_closed"


class UnknownWorkerError(ShardError):
    """The pushing worker is not among the job's live workers."""

    reason = "unknown_worker"


class StepAheadError(ShardError):
    """sync: a push for a step whose round has not opened yet (the worker skipped a pull)."""

    reason = "step_ahead"


class InvalidPushError(ShardError):
    """A malformed push: bad length, batch size, step, non-finite values or values beyond
    codec.MAX_GRADIENT (which would overflow Adam's state)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class TableMemoryError(ShardError):
    """A table's rows (and their optimizer state) cannot be allocated on this server."""

    reason = "bad_config"


class InvalidConfigError(ShardError):
    """An InitShard config or initial weights that cannot make a shard."""

    reason = "bad_config"


# Every `reason` label of shardps_ps_rejected_pushes_total (metrics export each at 0).
REJECT_REASONS = ("invalid", "bad_header", "bad_dtype", "bad_chunks", "bad_length", "non_finite",
                  "too_large", "bad_step", "bad_batch_size", "unknown_shard", "shard_closed", "unknown_worker",
                  "step_ahead", "bad_config", "fenced", "bad_encoding",
                  # replicated shards (replication.py): a worker's push to a replica that is
                  # not the primary, a forwarded push of an older replica epoch, a backup
                  # that did not take the primary's forward, a primary out of touch with
                  # the coordinator
                  "not_primary", "stale_replica", "backup_failed", "out_of_touch",
                  # sync: a push computed before a rollback the shard has applied
                  "before_rollback")


class FencedError(ShardError):
    """A push from a worker incarnation the coordinator declared dead (or replaced).

    The message starts with "fenced:" so the worker can tell it from other refusals.
    """

    reason = "fenced"
