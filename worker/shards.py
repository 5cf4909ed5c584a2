"""One job's parameter servers as the training loop sees them: pull and push that ride out
outages with a Backoff, follow the shard map when a server moves, map refusals to outcomes,
and turn a rollback (a server restored an older version) into a Rewind."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from shardps.proto import codec, coordinator_pb2, ps_pb2
from shardps.proto.common_pb2 import DType, ShardMap, ShardRange
from shardps.psclient import PullResult
from shardps.psclient.inflight import PullInFlight
from shardps.psclient.overlapped import OverlappedPush
from shardps.psclient.rows import RowClient
from shardps.runtime.backoff import Backoff
from shardps.worker import recovery, resync
from shardps.worker.coordclient import Unreachable
from shardps.worker.decisions import pull_args
from shardps.worker.flat import FlatParams
from shardps.worker.jobcontext import JobContext
from shardps.worker.outcome import End
from shardps.worker.wirepush import WirePush

logger = logging.getLogger(__name__)

PULL_SLICE_S = 1.0        # one pull waits on the servers at most this long, then we look at stop
PULL_PATIENCE_S = 600.0   # no weights of the wanted version for this long: abandon the job
RESYNC_POLL_S = 0.25      # after a rollback, a shard not yet back is asked again after this
# A pull or push that fails transiently (both are idempotent) is retried with doubling pauses
# from PS_BACKOFF_S up to PS_MAX_BACKOFF_S for PS_OUTAGE_S: long enough for a server to be
# restarted and restore its checkpoint, and for the coordinator to move it in the shard map.
PS_BACKOFF_S = 0.25
PS_MAX_BACKOFF_S = 2.0
PS_OUTAGE_S = 180.0
# A replicated job's shard fails over within about a lease: retry at most this far apart then,
# so that a worker follows the promoted primary soon after the map names it.
FAILOVER_MAX_BACKOFF_S = 0.5

_T = TypeVar("_T")
# Push outcomes that mean the shard has the gradient (shardps_worker_pushes_acked).
_ACKED = (ps_pb2.PUSH_STATUS_APPLIED, ps_pb2.PUSH_STATUS_ACCEPTED, ps_pb2.PUSH_STATUS_DUPLICATE)


class Rewind(Exception):
    """sync: go back to `step` (a rollback), or, if None, pull the same step again."""

    def __init__(self, step: int | None):
        super().__init__(f"rewind to step {step}")
        self.step = step


@dataclass
class Landing:
    """A pull whose reply heads are in and whose weights may still be landing."""

    inflight: PullInFlight
    begun: float  # the training clock when the pull was sent

    def result(self) -> PullResult:
        ready, versions, job_done = self.inflight.heads()
        return PullResult(ready=ready, versions=versions, job_done=job_done)


class JobShards:
    """Pull, push and init of one job on its servers, for the training thread that owns it.

    Rollbacks (docs/architecture.md, "Failures"): the context's assignment announces one;
    the next pull or push raises Rewind to its version, and pulls then wait until every shard
    is back at that version before training goes on.
    """

    def __init__(self, ctx: JobContext, factory: recovery.ShardClientFactory,
                 shard_map: ShardMap, *, dtype: DType, chunk_bytes: int, compress_pull: str = "none",
                 wire: WirePush | None = None):
        """The spec's transport settings: `wire` what pushes carry (wirepush.py; default
        uncompressed `dtype`), `compress_pull` the pulls' deltas."""
        self._ctx = ctx
        self._client = recovery.RemappableClient(  # pushes say which rollback we took, too
            factory, ctx.job_id, shard_map, dtype=dtype, chunk_bytes=chunk_bytes, worker_id=ctx.node_id,
            incarnation=ctx.incarnation, compress_pull=compress_pull, rollback_id=lambda: ctx.reports.rollback_id)
        self._resync_to: int | None = None  # while a rollback is taken: the version to reach
        # The embedding tables' row calls (worker/tablesync.py), following the same map.
        self.rows = RowClient(ctx.job_id, shard_map, worker_id=ctx.node_id, incarnation=ctx.incarnation)
        self.wire = wire if wire is not None else WirePush("none", dtype, ctx.job_id, ctx.metrics)
        self._push_wait_max = 0.0  # seconds: the longest push so far, retries included

    def close(self) -> None:
        self._client.close()
        self.rows.close()

    def init(self, weights: torch.Tensor, config: ps_pb2.ShardConfig) -> None:
        """InitShard on every server (rank 0 of a new job)."""
        self.call("InitShard", functools.partial(self._client.init, weights, config))

    def begin_push(self, grad: torch.Tensor, step: int, versions: list[int], batch_size: int,
                   then_pull: dict[str, Any] | None,
                   buckets: Sequence[tuple[int, int]]) -> OverlappedPush | None:
        """Opens an overlapped push of `grad` (worker/overlap.py fills it in), or None where it
        cannot be (compressed; a server not reachable now): `push` then sends it whole."""
        if self.wire.feedback is not None:
            return None
        wait = self._ctx.metrics.bucket_wait.labels(direction="push").observe
        try:
            return self._client.begin_push(grad, step=step, base_version=versions,
                                           batch_size=batch_size, buckets=buckets,
                                           then_pull=then_pull, on_wait=wait)
        except grpc.RpcError as exc:
            logger.debug("job %s: overlapped push not opened (%s); pushing whole",
                         self._ctx.job_id, exc)
            return None

    def push(self, grad: torch.Tensor, step: int, versions: list[int], batch_size: int,
             then_pull: dict[str, Any] | None,
             overlapped: OverlappedPush | None = None) -> list[ps_pb2.PushResponse]:
        """Pushes step's gradient (compressed once, before any try, if the job says so); may
        raise Rewind (a rollback, or a server behind us). `overlapped`: the push opened by
        `begin_push`, finished here; if it fails, the gradient is pushed whole (pushes are
        idempotent), through the retries and refusals of any push."""
        if overlapped is not None:
            try:
                replies = overlapped.finish()
            except grpc.RpcError as exc:
                logger.info("job %s: overlapped push of step %d failed (%s: %s); pushing whole",
                            self._ctx.job_id, step, exc.code().name, exc.details())
            else:
                self.wire.pushed(grad.numel(), None)
                return replies
        encoded = self.wire.encode(grad, self._client.shard_map.shards, step, functools.partial(
            self.call, "GetPreconditioner", self._client.preconditioners))
        begun = self._ctx.clock()
        replies = self.call("push", functools.partial(
            self._client.push, grad, step=step, base_version=versions, batch_size=batch_size,
            then_pull=then_pull, encoded=encoded))
        self.wire.pushed(grad.numel(), encoded)
        self._push_wait_max = _count_acked(self._ctx, self._client.shard_map.shards, replies,
                                           self._ctx.clock() - begun, self._push_wait_max)
        return replies

    def pull(self, mode: str, step: int, flat: FlatParams) -> list[int]:
        """Pulls the weights for `step` into the model, waiting in slices; returns the versions."""
        versions, landing = self._pull(mode, step, flat, overlap=False)
        assert landing is None
        return versions

    def pull_landing(self, mode: str, step: int,
                     flat: FlatParams) -> tuple[list[int], Landing]:
        """`pull`, returning once every shard's reply head is in, weights still landing
        (worker/overlap.py); call `land` after the forward. CPU, dense pulls only."""
        versions, landing = self._pull(mode, step, flat, overlap=True)
        assert landing is not None
        return versions, landing

    def land(self, landing: Landing, flat: FlatParams) -> None:
        """Waits for the rest of a `pull_landing` pull; Rewind if the transfer broke off."""
        try:
            received = landing.inflight.finish()
        except (grpc.RpcError, TimeoutError, codec.CodecError) as exc:
            raise self.broken(exc) from None
        self.wire.pulled(received)
        flat.upload()
        self._ctx.metrics.step_seconds.labels(phase="pull").observe(
            self._ctx.clock() - landing.begun)

    def broken(self, exc: BaseException) -> Rewind:
        """A pull broke off while landing: pull the step again (through `call`'s retries)."""
        logger.info("job %s: a pull broke off while landing (%s); pulling again",
                    self._ctx.job_id, exc)
        return Rewind(None)

    def _pull(self, mode: str, step: int, flat: FlatParams,
              overlap: bool) -> tuple[list[int], Landing | None]:
        ctx = self._ctx
        kwargs = pull_args(mode, step)
        since = ctx.clock()
        hist = ctx.metrics.step_seconds
        while True:
            ctx.check_stop()
            self.check_rollback()
            dest = flat.host_weights
            begun = ctx.clock()
            landing: Landing | None = None
            if overlap:
                landing = Landing(self.call("pull", functools.partial(
                    self._start_pull, dest, kwargs)), begun)
                result = landing.result()
            else:
                result = self.call("pull", functools.partial(
                    self._client.pull, dest, timeout_s=PULL_SLICE_S, **kwargs))
            if result.ready and self._resync_to is not None and not self._resynced(
                    list(result.versions)):
                # Some shard has not rolled back yet: its weights belong to another step.
                if landing is not None:
                    landing.inflight.cancel()
                if result.job_done:  # frozen shards apply no rollback
                    raise End("stopped", "the servers say the job has ended")
                if ctx.clock() - since > PULL_PATIENCE_S:
                    raise End("abandoned", f"the shards did not come back to version "
                                           f"{self._resync_to} within {PULL_PATIENCE_S:.0f} s; "
                                           f"versions {list(result.versions)}")
                ctx.pause(RESYNC_POLL_S)
                continue
            if result.ready and landing is not None:
                return list(result.versions), landing
            if result.ready:
                self.wire.pulled(result.wire_bytes)
                flat.upload()
                hist.labels(phase="pull").observe(ctx.clock() - begun)
                return list(result.versions), None
            if landing is not None:
                landing.inflight.cancel()  # not ready: no weights follow; readers done
            hist.labels(phase="wait").observe(ctx.clock() - begun)
            if result.job_done:
                raise End("stopped", "the servers say the job has ended")
            now = ctx.clock()
            if now - since > PULL_PATIENCE_S:
                raise End("abandoned", f"no weights for step {step} ({kwargs}) within "
                                       f"{PULL_PATIENCE_S:.0f} s; versions {result.versions}")
            if ctx.reports.buffer.due(now):  # keep the coordinator informed while we wait
                ctx.reports.send()
            if any(s.replica_epoch for s in self._client.shard_map.shards):
                # A copy that has since given its shard up (a failover, a reshard) keeps
                # answering pulls but never reaches the version: follow the map.
                self._refresh_shard_map()

    def _resynced(self, versions: list[int]) -> bool:
        """While a rollback is taken: whether `versions` show every shard back (resync.back)."""
        assert self._resync_to is not None
        if not resync.back(self._ctx.job_id, self._resync_to, self._ctx.reports.rollback_id,
                           [s.index for s in self._client.shard_map.shards], versions,
                           self.rows.shard_infos):
            return False
        self._resync_to = None
        return True

    def _start_pull(self, dest: torch.Tensor, kwargs: dict[str, int]) -> PullInFlight:
        """An overlapped pull once its heads are in (its readers stopped if it failed)."""
        inflight = self._client.start_pull(dest, timeout_s=PULL_SLICE_S, **kwargs)
        inflight.heads()
        return inflight

    def call(self, what: str, fn: Callable[[], _T]) -> _T:
        """Runs a parameter-server call; rides out outages, maps refusals to outcomes.

        Transient errors (a server down, restarting, or not yet told of a membership change)
        are retried with backoff for PS_OUTAGE_S; between tries the shard map is re-read, so
        a server that came back at another address is followed (a try on a map that just
        changed goes at once, without the pause), and (pull/push) a rollback ends the call.
        A fenced push ends the job here (the daemon registers again); a push ahead of a
        restored shard's round rewinds to a pull.
        """
        ctx = self._ctx
        replicated = any(s.replica_epoch for s in self._client.shard_map.shards)
        backoff = Backoff(PS_BACKOFF_S, FAILOVER_MAX_BACKOFF_S if replicated else PS_MAX_BACKOFF_S,
                          PS_OUTAGE_S, ctx.clock)
        followed = False  # the last retry went at once to a new map
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                _refused(ctx, self.wire, what, code, details)
                # A shard that moved (a failover, a reshard, a server back elsewhere) is
                # on the new map at once: retry there without a pause, once in a row.
                if not followed and self._refresh_shard_map():
                    followed = True
                    ctx.metrics.retries.labels(call=what, code=code.name).inc()
                    continue
                followed = False
                if backoff.expired():
                    raise End("abandoned", f"{what} failed: {code.name}: {details}"
                              + (f" (for {PS_OUTAGE_S:.0f} s)" if backoff.tries else "")) from None
                pause = backoff.next()
                ctx.metrics.retries.labels(call=what, code=code.name).inc()
                if backoff.tries == 1 or backoff.tries % 10 == 0:
                    logger.warning("job %s: %s %s (%s); retrying for up to %.0f s (try %d)",
                                   ctx.job_id, what, code.name, details, PS_OUTAGE_S,
                                   backoff.tries)
                if ctx.pause(pause):
                    ctx.check_stop()
                self._refresh_shard_map()
                if what in ("pull", "push"):
                    self.check_rollback()

    def _refresh_shard_map(self) -> bool:
        """Follows the coordinator's shard map (best effort: it may be down as well);
        returns whether it changed."""
        ctx = self._ctx
        try:
            job = ctx.coordinator.call("GetJob", coordinator_pb2.GetJobRequest(
                job_id=ctx.job_id), attempts=1).job
        except (grpc.RpcError, Unreachable):
            return False
        self.rows.remap(job.shard_map)
        if not self._client.remap(job.shard_map):
            return False
        logger.info("job %s: shard map version %d: %s", ctx.job_id, job.shard_map.version,
                    ", ".join(f"{s.index}@{s.address}" for s in job.shard_map.shards))
        return True

    def check_rollback(self) -> None:
        """Raises Rewind if the coordinator has announced a rollback we have not taken."""
        ctx = self._ctx
        assignment = ctx.assignment()
        if assignment.rollback_id <= ctx.reports.rollback_id:
            return
        ctx.reports.rollback_id = assignment.rollback_id
        self._resync_to = assignment.rollback_version
        ctx.metrics.rollbacks.labels(job=ctx.job_id).inc()
        logger.warning("job %s: rollback %d: a server restored version %d; resuming at step %d "
                       "(the steps after it are replayed)", ctx.job_id, assignment.rollback_id,
                       assignment.rollback_version, assignment.rollback_version)
        self.wire.rewind(assignment.rollback_version)  # as it was there, if it was saved
        raise Rewind(assignment.rollback_version)


def _count_acked(ctx: JobContext, shards: Sequence[ShardRange],
                 replies: list[ps_pb2.PushResponse], seconds: float, longest: float) -> float:
    """Counts the pushes each shard acknowledged and the longest push so far; returns it."""
    for shard, reply in zip(shards, replies, strict=True):
        if reply.status in _ACKED:
            ctx.metrics.pushes_acked.labels(job=ctx.job_id, shard=str(shard.index)).inc()
    if seconds > longest:
        ctx.metrics.push_wait_max.labels(job=ctx.job_id).set(seconds)
    return max(seconds, longest)


def _refused(ctx: JobContext, wire: WirePush, what: str, code: grpc.StatusCode,
             details: str) -> None:
    """Raises what a failed call means; returns only for a transient error (retry it)."""
    action = recovery.classify(code, details)
    if action == recovery.INVALID:  # we sent something wrong
        raise ctx.fail(f"server rejected {what}: {details}") from None
    if action == recovery.FENCED:
        ctx.metrics.refused.labels(reason="fenced").inc()
        raise End("fenced", f"{what} refused: {details}") from None
    if action == recovery.RESYNC:
        ctx.metrics.refused.labels(reason="step_ahead").inc()
        logger.info("job %s: %s refused (%s); pulling again", ctx.job_id, what, details)
        wire.reset()  # the residuals belong to a push that was not applied
        raise Rewind(None) from None
    if action == recovery.ABANDON:
        raise End("abandoned", f"{what} failed: {code.name}: {details}") from None
