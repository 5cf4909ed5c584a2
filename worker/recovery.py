"""How a worker rides out failures: which parameter-server errors to retry, a PSClient that
follows shard-map changes, and the resume version (docs/architecture.md,
"Failures")."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc
import torch

from shardps.proto import codec, common_pb2, ps_pb2, ps_pb2_grpc, refusals
from shardps.psclient import PullResult
from shardps.psclient.deltas import PulledCopy
from shardps.psclient.inflight import PullInFlight
from shardps.psclient.overlapped import OverlappedPush
from shardps.runtime import rpc

logger = logging.getLogger(__name__)

# What to do about a failed pull or push:
RETRY = "retry"        # transient: the server is down, restarting or has not heard of us yet
FENCED = "fenced"      # this incarnation was declared dead: end the job here, register again
RESYNC = "resync"      # sync: the servers are behind our step (a restore): pull again
INVALID = "invalid"    # we sent something wrong: fail the job
ABANDON = "abandon"    # anything else: give the job up (the daemon may retry it later)

_RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)


def classify(code: grpc.StatusCode, details: str) -> str:
    """Maps a parameter server's status to one of the actions above.

    NOT_FOUND is retried: a restarted server serves only once it has restored its shards,
    but its shard may also come back under a new address (the shard map follows).
    """
    details = details or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return INVALID
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        if details.startswith(refusals.FENCED):
            return FENCED
        if details.startswith(refusals.STEP_AHEAD):
            return RESYNC
        if details.startswith(refusals.NOT_LIVE):
            return RETRY
        return ABANDON
    return RETRY if code in _RETRY_CODES else ABANDON


def stale_incarnation(code: grpc.StatusCode, details: str | None) -> bool:
    """Whether the coordinator refused a call because this incarnation is no longer current
    (declared dead, or the node registered again): the worker must register again."""
    return (code == grpc.StatusCode.FAILED_PRECONDITION
            and (details or "").endswith("register again"))


class ShardClient(Protocol):
    """What the training loop calls on a job's parameter servers (psclient.PSClient)."""

    rollback_id: int | None  # sent with every push (PSClient.rollback_id)
    pulled: PulledCopy | None  # compressed pulls' copy (PSClient.pulled)

    def pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
             clock: int = 0) -> PullResult: ...

    def push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
             batch_size: int, then_pull: dict[str, Any] | None = None,
             encoded: Sequence[bytes] | None = None) -> list[ps_pb2.PushResponse]: ...

    def begin_push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
                   batch_size: int, buckets: Sequence[tuple[int, int]],
                   then_pull: dict[str, Any] | None = None,
                   on_wait: Callable[[float], None] | None = None) -> OverlappedPush: ...

    def start_pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
                   clock: int = 0) -> PullInFlight: ...

    def init(self, weights: torch.Tensor, config: ps_pb2.ShardConfig) -> None: ...

    def preconditioners(self) -> list[torch.Tensor]: ...

    def close(self) -> None: ...


class ShardClientFactory(Protocol):
    """Makes a ShardClient for one job's shard map (psclient.PSClient's constructor)."""

    def __call__(self, job_id: str, shard_map: common_pb2.ShardMap, *, dtype: common_pb2.DType,
                 chunk_bytes: int, worker_id: str, incarnation: int,
                 compress_pull: str) -> ShardClient: ...


class RemappableClient:
    """A PSClient that can be rebuilt on a new shard map; every call goes to the current one.

    Bound methods taken before a `remap` keep working (they look the client up per call).
    Owned by one training thread, like the PSClient inside it.
    """

    def __init__(self, factory: ShardClientFactory, job_id: str,
                 shard_map: common_pb2.ShardMap, *, dtype: common_pb2.DType = common_pb2.DTYPE_FLOAT32,
                 chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES, worker_id: str = "",
                 incarnation: int = 0, compress_pull: str = "none",
                 rollback_id: Callable[[], int] | None = None):
        """`rollback_id`: reads the rollback the worker has taken, which every push carries
        (PSClient.rollback_id); None: pushes carry none."""
        self._connect = functools.partial(factory, job_id, dtype=dtype, chunk_bytes=chunk_bytes,
                                          worker_id=worker_id, incarnation=incarnation,
                                          compress_pull=compress_pull)
        self.shard_map = shard_map
        self.client = self._connect(shard_map)
        self._rollback_id = rollback_id

    def remap(self, shard_map: common_pb2.ShardMap) -> bool:
        """Switches to `shard_map` if it sends a shard elsewhere (a server came back at
        another address, a primary moved); returns whether it did. A map that changes only
        backups or epochs is kept without reconnecting. Compressed pulls keep their copy."""
        if not shard_map.shards or shard_map == self.shard_map:
            return False
        if _routes(shard_map) == _routes(self.shard_map):
            self.shard_map = shard_map
            return False
        old, self.client = self.client, self._connect(shard_map)
        if old.pulled is not None and old.pulled.carries(self.client.pulled):
            self.client.pulled = old.pulled  # only the moved shards pull dense again
        self.shard_map = shard_map
        old.close()
        return True

    def pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
             clock: int = 0) -> PullResult:
        return self.client.pull(dest, min_version=min_version, timeout_s=timeout_s, clock=clock)

    def push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
             batch_size: int, then_pull: dict[str, Any] | None = None,
             encoded: Sequence[bytes] | None = None) -> list[ps_pb2.PushResponse]:
        return self._stamped().push(grad, step=step, base_version=base_version,
                                batch_size=batch_size, then_pull=then_pull, encoded=encoded)

    def begin_push(self, grad: torch.Tensor, *, step: int, base_version: int | list[int],
                   batch_size: int, buckets: Sequence[tuple[int, int]],
                   then_pull: dict[str, Any] | None = None,
                   on_wait: Callable[[float], None] | None = None) -> OverlappedPush:
        return self._stamped().begin_push(grad, step=step, base_version=base_version,
                                          batch_size=batch_size, buckets=buckets,
                                          then_pull=then_pull, on_wait=on_wait)

    def _stamped(self) -> ShardClient:
        """The current client, its pushes stamped with the worker's rollback as of now."""
        self.client.rollback_id = self._rollback_id() if self._rollback_id else None
        return self.client

    def start_pull(self, dest: torch.Tensor, *, min_version: int = 0, timeout_s: float = 30.0,
                   clock: int = 0) -> PullInFlight:
        return self.client.start_pull(dest, min_version=min_version, timeout_s=timeout_s,
                                      clock=clock)

    def preconditioners(self) -> list[torch.Tensor]:
        return self.client.preconditioners()

    def init(self, weights: torch.Tensor, config: ps_pb2.ShardConfig) -> None:
        """InitShard on every replica of every shard: the primaries through the current
        client, each layer of backups through a client of its own (replicated jobs, whose
        shards then carry the map in `replica_map`)."""
        layers = backup_layers(self.shard_map)
        if layers:
            config = _with_replica_map(config, self.shard_map)
        self.client.init(weights, config)
        for layer in layers:
            client = self._connect(layer)
            try:
                client.init(weights, config)
            finally:
                client.close()

    def close(self) -> None:
        self.client.close()


def _routes(shard_map: common_pb2.ShardMap) -> list[tuple[int, str, int, int]]:
    """What a client of the map reaches: each shard's index, primary address and range."""
    return [(s.index, s.address, s.offset, s.length) for s in shard_map.shards]


def backup_layers(shard_map: common_pb2.ShardMap) -> list[common_pb2.ShardMap]:
    """The shard map with each shard's k-th backup in place of its primary, for k = 0, 1, ...
    as far as every shard has one (a fresh replicated map: replicas - 1 layers; none for a
    job without replicas)."""
    depth = min((len(s.backup_ids) for s in shard_map.shards), default=0)
    layers = []
    for k in range(depth):
        layer = common_pb2.ShardMap()
        layer.CopyFrom(shard_map)
        for shard in layer.shards:
            shard.server_id, shard.address = shard.backup_ids[k], shard.backup_addresses[k]
        layers.append(layer)
    return layers


def _with_replica_map(config: ps_pb2.ShardConfig,
                      shard_map: common_pb2.ShardMap) -> ps_pb2.ShardConfig:
    copy = ps_pb2.ShardConfig()
    copy.CopyFrom(config)
    copy.replica_map.CopyFrom(shard_map)
    return copy


def resume_version(shard_map: common_pb2.ShardMap, old_job: str, sync: bool) -> int:
    """The checkpoint version a resumed job starts from (ShardConfig.resume_version).

    sync: the newest version every shard holds a valid checkpoint of (the shards must agree
    on the version for rounds to line up); other modes: -1, each shard's newest.

    Raises:
        ValueError: no version is held by every shard.
        grpc.RpcError: a server could not be asked.
    """
    if not sync:
        return -1
    common: set[int] | None = None
    for shard in shard_map.shards:
        with rpc.make_channel(shard.address) as channel:
            reply = ps_pb2_grpc.ParameterServerStub(channel).ListCheckpoints(
                ps_pb2.ListCheckpointsRequest(job_id=old_job), timeout=rpc.CONTROL_DEADLINE_S)
        held = {c.version for c in reply.checkpoints if c.shard_index == shard.index}
        common = held if common is None else common & held
    if not common:
        raise ValueError(f"the servers hold no checkpoint version of job {old_job} common to "
                         "every shard")
    return max(common)
