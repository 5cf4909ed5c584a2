"""replicas: push-and-apply throughput of a replicated shard (R = 2: the primary forwards each
push to its backup before it applies and answers) against an unreplicated one (R = 1), and
the servers' memory for each.

A real coordinator and two real `shardps-server`s (1 torch thread each); one async shard of
PARAMS elements per job, R = 1 on server A, R = 2 with A primary and B backup, initialised as
rank 0 does (every copy). One PSClient pushes to each job in turn, so both see the same load;
each row is the median of the timed pushes, end to end (wire, the forward, the apply, the
reply). Memory: each server's resident set after a job's shards were created and pushed once,
minus before (R = 1 adds a share to A only; R = 2 a share to A and one to B).

  python -m bench.replicas                # 10M, 20 pushes per job      (~1 min)
  python -m bench.replicas --small
"""

from __future__ import annotations

import time

import torch

from bench import procs, report
from shardps.client.api import CoordinatorClient
from shardps.proto import common_pb2, ps_pb2
from shardps.psclient import PSClient
from shardps.worker.recovery import backup_layers

WORKER = "worker-bench"


class Job:
    """One async job of one shard with `replicas` copies on `servers` (node id, address)."""

    def __init__(self, name: str, params: int, servers: list[tuple[str, str]], replicas: int):
        self.job_id = name
        smap = procs.shard_map([servers[0][1]], params)
        shard = smap.shards[0]
        shard.server_id = servers[0][0]
        if replicas > 1:
            for node_id, address in servers[1:replicas]:
                shard.backup_ids.append(node_id)
                shard.backup_addresses.append(address)
            shard.replica_epoch = 1
        config = ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=1e-4, beta1=0.9, beta2=0.999,
                                                 eps=1e-8),
            mode=common_pb2.CONSISTENCY_ASYNC, workers=[WORKER], epoch=1,
            layout_fingerprint="bench")
        if replicas > 1:
            config.replica_map.CopyFrom(smap)
        weights = torch.zeros(params)
        for layer in [smap, *backup_layers(smap)]:
            with PSClient(name, layer, worker_id=WORKER) as init:
                init.init(weights, config)
        self.client = PSClient(name, smap, worker_id=WORKER)
        self.grad = torch.randn(params) * 1e-3
        self.step = 0
        self.push()  # allocates Adam's state on every copy

    def push(self) -> float:
        start = time.perf_counter()
        reply = self.client.push(self.grad, step=self.step, base_version=self.step, batch_size=1)
        seconds = time.perf_counter() - start
        assert reply[0].status == ps_pb2.PUSH_STATUS_APPLIED, reply
        self.step += 1
        return seconds


def main() -> None:
    parser = report.parser(__doc__, "1M, 5 pushes")
    parser.add_argument("--params", default="10M")
    parser.add_argument("--steps", type=int, default=20, help="timed pushes per job")
    args = parser.parse_args()
    if args.small:
        args.params, args.steps = "1M", 5
    params = report.parse_count(args.params)
    coord = procs.Child("shardps-coordinator", ["--port", "0", "--metrics-port", "-1",
                                                "--log-level", "WARNING"])
    servers = procs.start_servers(2, extra=["--coordinator", coord.address])
    client = CoordinatorClient(coord.address)
    try:
        procs.wait_until(lambda: len(client.nodes()) == 2, 60)
        ids = {n.address: n.node_id for n in client.nodes()}
        placed = [(ids[s.address], s.address) for s in servers]
        rss = [s.rss_bytes() for s in servers]
        jobs, memory = {}, {}
        for replicas in (1, 2):
            jobs[replicas] = Job(f"bench-replicas-{replicas}", params, placed, replicas)
            now = [s.rss_bytes() for s in servers]
            memory[replicas] = [(b - a) / 2**20 for a, b in zip(rss, now, strict=True)]
            rss = now
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.steps):  # interleaved, so both see the same machine load
            for replicas, job in jobs.items():
                times[replicas].append(job.push())
        for job in jobs.values():
            job.client.close()
    finally:
        client.close()
        procs.stop_all([*servers, coord])
    share = params * 4 * 3 / 2**20  # weights, m and v in fp32
    table = report.Table("replicas: async push and apply, end to end, R = 2 vs R = 1",
                         ["params", "R", "push_ms", "Mparam_s", "vs_R1", "rss_MiB_server_A",
                          "rss_MiB_server_B", "share_MiB"])
    base = report.median(times[1])
    for replicas in (1, 2):
        median = report.median(times[replicas])
        table.add(params=report.human(params), R=replicas, push_ms=median * 1e3,
                  Mparam_s=params / median / 1e6, vs_R1=base / median,
                  rss_MiB_server_A=memory[replicas][0], rss_MiB_server_B=memory[replicas][1],
                  share_MiB=share)
    report.write("replicas", [table], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
