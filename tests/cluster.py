"""A shardps cluster inside the test process: the real coordinator, parameter servers and
workers as daemons on port 0, talking real gRPC over loopback (tests/integration).

`Cluster` starts and stops them; `RegisteredWorker` is a worker node the test registers and
keeps alive itself (what `WorkerDaemon` does around a Trainer), for tests that run a
`Trainer` directly and need to hold it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import yaml

from shardps.client.api import CoordinatorClient
from shardps.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc, ps_pb2, ps_pb2_grpc
from shardps.proto.states import FINAL_STATES
from shardps.psclient import PSClient
from shardps.runtime import rpc
from shardps.server.coordinator.daemon import CoordinatorDaemon
from shardps.server.ps.daemon import ParameterServerDaemon
from shardps.worker.daemon import WorkerDaemon
from tests.harness import poll

ALIVE = coordinator_pb2.NODE_STATE_ALIVE


class Cluster:
    """A coordinator, `servers` parameter servers and `workers` worker daemons, started.

    Workers use one torch thread each (the machine is shared) and the given
    `step_delays_ms` (one per worker, default 0). `close()` stops everything in reverse.
    """

    def __init__(self, servers: int = 1, workers: int = 0, lease_ms: int = 2000,
                 step_delays_ms: list[int] | None = None, data_port: int = 0):
        """`data_port`: the servers' data planes (0: on, a port each; -1: off, gRPC only)."""
        self.coordinator = CoordinatorDaemon("127.0.0.1", 0, lease_ms=lease_ms,
                                             metrics_port=-1).start()
        self.address = self.coordinator.address
        self.client = CoordinatorClient(self.address)
        self._channel = rpc.make_channel(self.address)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        # Metrics are read from each daemon's registry, so no endpoints are bound.
        self.servers = [ParameterServerDaemon(coordinator=self.address, data_port=data_port).start()
                        for _ in range(servers)]
        self.workers: list[WorkerDaemon] = []
        for delay in step_delays_ms or [0] * workers:
            self.add_worker(step_delay_ms=delay)
        self.wait_alive()

    def add_worker(self, **kwargs: Any) -> WorkerDaemon:
        worker = WorkerDaemon(self.address, device="cpu", threads=1, **kwargs)
        worker.start()
        self.workers.append(worker)
        return worker

    def wait_alive(self, timeout: float = 30.0) -> None:
        """Waits until every server and worker daemon is registered and alive, and every
        worker daemon has heard its id back (the coordinator records a node a moment before
        the daemon learns its id; a test that orders workers by id must not see "")."""
        want = len(self.servers) + len(self.workers)
        poll(lambda: sum(n.state == ALIVE for n in self.client.nodes()) >= want, timeout,
             interval=0.05, what=f"{want} nodes alive")
        poll(lambda: all(w.node_id for w in self.workers), timeout, interval=0.02,
             what="every worker knowing its id")

    def submit(self, spec: dict[str, Any] | str) -> str:
        return self.client.submit(spec if isinstance(spec, str) else yaml.safe_dump(spec))

    def job(self, job_id: str, history: bool = False) -> coordinator_pb2.JobInfo:
        return self.client.job(job_id, history)

    def wait(self, job_id: str, timeout: float = 120.0) -> coordinator_pb2.JobInfo:
        """Polls until the job is final; returns it with its history."""
        self.client.wait(job_id, timeout_s=timeout, interval_s=0.05)
        return self.job(job_id, history=True)

    def server_of(self, address: str) -> ParameterServerDaemon:
        return next(s for s in self.servers if s.address == address)

    def shard_infos(self, job_id: str) -> list[ps_pb2.ShardInfo]:
        """Every shard of the job as its server reports it (GetShardInfo), in shard order."""
        infos = []
        for shard in self.job(job_id).shard_map.shards:
            with rpc.make_channel(shard.address) as channel:
                reply = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
                    ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=rpc.CONTROL_DEADLINE_S)
            infos += [s for s in reply.shards if s.shard_index == shard.index]
        return infos

    def weights(self, job_id: str) -> torch.Tensor:
        """The job's flat fp32 weights as its servers hold them now."""
        info = self.job(job_id)
        flat = torch.empty(info.layout.total)
        with PSClient(job_id, info.shard_map) as ps:
            assert ps.pull(flat, timeout_s=rpc.CONTROL_DEADLINE_S).ready
        return flat

    def frozen(self, job_id: str) -> bool:
        """Whether every server has learned that the job is final (its shards are frozen)."""
        return all(s.state in FINAL_STATES for s in self.shard_infos(job_id))

    def idle(self) -> bool:
        """Whether no worker daemon runs a training thread."""
        return all(w._job is None or not w._job.thread.is_alive() for w in self.workers)

    def close(self) -> None:
        for worker in reversed(self.workers):
            worker.stop(grace=5)
        for server in reversed(self.servers):
            server.stop(0)
        self.client.close()
        self._channel.close()
        self.coordinator.stop(0)


class RegisteredWorker:
    """A worker node registered with the coordinator and kept alive by a heartbeat thread.

    It never trains by itself: the test runs a `Trainer` with this node's id, incarnation and
    `assignment` (the latest one a heartbeat returned).
    """

    def __init__(self, stub: coordinator_pb2_grpc.CoordinatorStub, node_id: str = ""):
        self._stub = stub
        reply = stub.RegisterNode(coordinator_pb2.RegisterNodeRequest(
            role=common_pb2.ROLE_WORKER, device="cpu", hostname="test", node_id=node_id),
            timeout=rpc.CONTROL_DEADLINE_S)
        self.node_id, self.incarnation = reply.node_id, reply.incarnation
        self._period = reply.lease_ms / 4000
        self.assignment = coordinator_pb2.WorkerAssignment()
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.node_id)
        self._thread.start()

    def _beat(self, shutting_down: bool = False) -> None:
        reply = self._stub.Heartbeat(coordinator_pb2.HeartbeatRequest(
            node_id=self.node_id, incarnation=self.incarnation, shutting_down=shutting_down),
            timeout=rpc.CONTROL_DEADLINE_S)
        assert not reply.unknown_node, f"{self.node_id} lost its lease"
        self.assignment = reply.assignment

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._beat()

    def wait_assignment(self, timeout: float = 10.0) -> coordinator_pb2.WorkerAssignment:
        poll(lambda: self.assignment.job_id, timeout, interval=0.02, what="an assignment")
        return self.assignment

    def stop(self, goodbye: bool = True) -> None:
        """Stops heartbeating; without the goodbye the node dies when its lease runs out."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        if goodbye:
            self._beat(shutting_down=True)
