"""The primary's half of catch-up by transfer (docs/architecture.md, "Catch-up by transfer"):
when the map names a joining copy of a shard this server is primary of, it captures the
shard's whole state under the shard's turn, tells the joiner to start queueing (JoinShard)
and arms it there (from then on every push is forwarded to it too, which queues them), then
streams the state to it as a checkpoint's files (TransferShard, in chunks, under one
deadline). Pushes go on meanwhile.

A sync shard is captured only between rounds (no contribution buffered), so the state is
exactly the applied rounds plus nothing half-done; the capture retries every few ms until
then, up to CAPTURE_TIMEOUT_S. A transfer that fails disarms the joiner and is not retried
for that join: the coordinator drops the joining copy after its join timeout and adds one
again.

Thread-safe: each transfer runs on its own daemon thread; `shutdown()` ends them at their
next step.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from shardps.proto import codec, ps_pb2, ps_pb2_grpc
from shardps.runtime import rpc

from . import checkpoint
from .checkpoint import ShardState
from .errors import ShardError
from .registry import ShardRegistry
from .replication import Placement, Replicas

log = logging.getLogger("shardps.ps")

CAPTURE_TIMEOUT_S = 60.0   # waiting for a sync shard's round to be empty
TURN_TIMEOUT_S = 5.0       # one wait for the shard's turn
TRANSFER_DEADLINE_S = 300.0  # the whole TransferShard stream
RETRY_PAUSE_S = 0.005


class TransferSender:
    """Starts one transfer per (shard, joiner, join epoch) this server is primary of.

    `placement_changed` is a Replicas.on_placement hook; `count(result)` counts a finished
    transfer ("done", "failed"; shardps_ps_transfers_total).
    """

    def __init__(self, replicas: Replicas, shards: ShardRegistry, self_id: Callable[[], str],
                 count: Callable[[str], None] = lambda result: None):
        self._replicas = replicas
        self._shards = shards
        self._self_id = self_id
        self._lock = threading.Lock()
        self._started: set[tuple[str, int, str, int]] = set()
        self._stopping = threading.Event()
        self._count = count

    def placement_changed(self, job_id: str, index: int, placement: Placement) -> None:
        if placement.primary != self._self_id() or not placement.joiners:
            return
        for joiner in placement.joiners:
            key = (job_id, index, joiner[0], joiner[2])
            with self._lock:
                if key in self._started:
                    continue
                self._started.add(key)
            threading.Thread(target=self._run, args=(job_id, index, joiner), daemon=True,
                             name=f"transfer-{job_id}-{index}").start()

    def shutdown(self) -> None:
        self._stopping.set()

    def _run(self, job_id: str, index: int, joiner: tuple[str, str, int]) -> None:
        joiner_id, address, join_epoch = joiner
        start = time.monotonic()
        try:
            state = self._capture_and_arm(job_id, index, joiner)
            reply = send(state, address, join_epoch)
        except Exception as exc:  # any failure: the join is abandoned (module docstring)
            self._replicas.disarm(job_id, index, joiner_id, join_epoch)
            self._count("failed")
            log.warning("job %s shard %d: transfer to joining copy %s (join epoch %d) failed: "
                        "%s", job_id, index, joiner_id, join_epoch, exc)
            return
        self._count("done")
        log.info("job %s shard %d: transferred version %d to %s in %.2f s (it replayed %d "
                 "queued push(es))", job_id, index, state.version, joiner_id,
                 time.monotonic() - start, reply.drained)

    def _capture_and_arm(self, job_id: str, index: int,
                         joiner: tuple[str, str, int]) -> ShardState:
        if self._shards.get(job_id, index).config.tables:
            # Row pushes are not forwarded to copies: a copy would miss those after the capture.
            raise ShardError("a shard with embedding tables cannot be transferred")
        deadline = time.monotonic() + CAPTURE_TIMEOUT_S
        while time.monotonic() < deadline and not self._stopping.is_set():
            with self._replicas.shard_turn(job_id, index, TURN_TIMEOUT_S) as held:
                if held:
                    state = self._shards.get(job_id, index).capture_between_rounds()
                    if state is not None:
                        begin(job_id, index, joiner)
                        self._replicas.arm(job_id, index, joiner)
                        return state
            time.sleep(RETRY_PAUSE_S)
        raise ShardError(f"no capture between rounds within {CAPTURE_TIMEOUT_S:.0f} s")


def begin(job_id: str, index: int, joiner: tuple[str, str, int]) -> None:
    """JoinShard: the joiner starts a fresh queue (called under the shard's turn)."""
    with rpc.make_channel(joiner[1]) as channel:
        ps_pb2_grpc.ParameterServerStub(channel).JoinShard(
            ps_pb2.JoinShardRequest(job_id=job_id, shard_index=index, join_epoch=joiner[2]),
            timeout=rpc.CONTROL_DEADLINE_S)


def send(state: ShardState, address: str, join_epoch: int) -> ps_pb2.TransferShardResponse:
    """Streams `state` as a checkpoint's files to the joining copy at `address`."""
    with tempfile.TemporaryDirectory(prefix="shardps-transfer-") as tmp:
        path = checkpoint.write(tmp, state, keep=1)
        with rpc.make_channel(address) as channel:
            stub = ps_pb2_grpc.ParameterServerStub(channel)
            return stub.TransferShard(
                _requests(path, state.job_id, state.index, join_epoch),
                timeout=TRANSFER_DEADLINE_S)


def _requests(path: Path, job_id: str, index: int,
              join_epoch: int) -> Iterator[ps_pb2.TransferShardRequest]:
    yield ps_pb2.TransferShardRequest(job_id=job_id, shard_index=index, join_epoch=join_epoch)
    for file in sorted(path.iterdir()):
        data = file.read_bytes()
        for offset in range(0, max(len(data), 1), codec.DEFAULT_CHUNK_BYTES):
            yield ps_pb2.TransferShardRequest(
                file=file.name, offset=offset,
                data=data[offset:offset + codec.DEFAULT_CHUNK_BYTES])
