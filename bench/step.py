"""step: one training step split into pull, compute, push and the server's apply, for a 10M-
and a 100M-parameter model with 1 worker and 1 server, against the same step with no server.

The worker side is shardps's own (FlatParams views, PSClient) in this process; the server is a
real `shardps-server` (sync job, one worker: each push closes a round, so the push's reply
waits for the server's Adam, which the server's metrics time). The baseline runs the same
forward/backward and `torch.optim.Adam(fused=True)` in one process. Steps alternate between
the two; medians.

  python -m bench.step                  # 10M and 100M, overlap off and on
  python -m bench.step --overlap on     # only the overlapped worker step
  python -m bench.step --params digits --servers 2 --steps 200   # the tta job's model
  python -m bench.step --overlap on --shared-memory on,off   # the same-host path against the socket
  python -m bench.step --small
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from bench import procs, report
from shardps.proto import common_pb2, ps_pb2
from shardps.psclient import PSClient
from shardps.worker.flat import FlatParams
from shardps.worker.overlap import Overlap

JOB = "bench-step"
BATCH = 32


def mlp(params: int) -> tuple[nn.Module, int]:
    """A ReLU MLP of about `params` parameters: width w, input w, four w x w layers, 10 outputs."""
    width = max(64, round((params / 5) ** 0.5 / 64) * 64)
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers), width


class Baseline:
    """The same model, forward/backward and fused Adam in this process."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adam = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.adam.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        t1 = time.perf_counter()
        self.adam.step()
        return t1 - t0, time.perf_counter() - t1


def digits_mlp() -> tuple[nn.Module, int]:
    """The model of the digits job (bench.tta): 64 inputs, hidden [128, 64], 10 classes."""
    layers = [nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)]
    return nn.Sequential(*layers), 64


class Shardps:
    """A worker's step against real servers: pull -> forward/backward -> push; `overlapped`
    as a worker with transport.overlap does it (worker/overlap.py)."""

    def __init__(self, model: nn.Module, servers: list[procs.Child], chunk_bytes: int,
                 shards_per_server: int = 1):
        self.flat = FlatParams(model)
        self.model = model
        self.hooks = Overlap(model, self.flat.layout)
        self.servers = servers
        smap = procs.shard_map([s.address for s in servers for _ in range(shards_per_server)],
                               self.flat.numel)
        self.ps = PSClient(JOB, smap, worker_id="w0", chunk_bytes=chunk_bytes)
        self.ps.init(self.flat.weights_cpu(), ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8),
            mode=common_pb2.CONSISTENCY_SYNC, workers=["w0"], epoch=1, layout_fingerprint="bench"))
        self.version = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        result = self.ps.pull(self.flat.host_weights, min_version=self.version, timeout_s=60)
        assert result.ready
        self.flat.upload()
        t1 = time.perf_counter()
        self.flat.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        grad = self.flat.host_grad()
        t2 = time.perf_counter()
        applied = [s.metric("shardps_ps_apply_seconds_sum") for s in self.servers]
        t3 = time.perf_counter()
        # As a sync worker does: the next pull goes out behind the push.
        replies = self.ps.push(grad, step=self.version, base_version=self.version, batch_size=len(x),
                               then_pull={"min_version": self.version + 1, "timeout_s": 60})
        t4 = time.perf_counter()
        # Shards apply in parallel: the reply waits for the slowest.
        apply = max(s.metric("shardps_ps_apply_seconds_sum") - a for s, a in zip(self.servers, applied, strict=True))
        assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
        self.version += 1
        return {"pull": t1 - t0, "compute": t2 - t1, "push": t4 - t3 - apply, "apply": apply,
                "total": (t2 - t0) + (t4 - t3)}

    def overlapped(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """The same step with overlap: the forward starts on weights as they land, backward
        hands each bucket to a push already open. `pull`: until every head was in, plus the
        forward's waits for weights; `push`: from backward's end to the last reply, less
        the server's apply; `total`: the whole step."""
        applied = [s.metric("shardps_ps_apply_seconds_sum") for s in self.servers]
        t0 = time.perf_counter()
        inflight = self.ps.start_pull(self.flat.host_weights, min_version=self.version,
                                      timeout_s=60)
        assert inflight.heads()[0]
        t1 = time.perf_counter()
        self.hooks.arm_pull(inflight)
        try:
            out = self.model(x)
        finally:
            self.hooks.disarm_pull()
        inflight.finish()
        self.flat.zero_grad()
        loss = nn.functional.cross_entropy(out, y)
        push = self.ps.begin_push(self.flat.grad, step=self.version, base_version=self.version,
                                  batch_size=len(x), buckets=self.hooks.buckets,
                                  then_pull={"min_version": self.version + 1, "timeout_s": 60})
        self.hooks.arm_push(push)
        try:
            loss.backward()
        finally:
            self.hooks.disarm_push()
        t2 = time.perf_counter()
        replies = push.finish()
        t3 = time.perf_counter()
        apply = max(s.metric("shardps_ps_apply_seconds_sum") - a for s, a in zip(self.servers, applied, strict=True))
        assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
        self.version += 1
        waited = self.hooks.waited_s
        return {"pull": t1 - t0 + waited, "compute": t2 - t1 - waited, "push": t3 - t2 - apply,
                "apply": apply, "total": t3 - t0}

    def close(self) -> None:
        self.hooks.close()
        self.ps.close()


def main() -> None:
    parser = report.parser(__doc__, "1M, 2 steps")
    parser.add_argument("--params", default="10M,100M", help="sizes, or 'digits' for the tta model")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--shards", type=int, default=1, help="shards per server")
    parser.add_argument("--steps", type=int, default=5, help="timed steps each (after a warm-up)")
    parser.add_argument("--chunk-bytes", default="1M")
    parser.add_argument("--overlap", default="off,on",
                        help="worker steps to time, interleaved: off (pull, compute, push in "
                             "turn), on (transport.overlap)")
    parser.add_argument("--shared-memory", default="on",
                        help="the servers' --shared-memory: on (the same-host path), off (the "
                             "loopback socket), or on,off (a set of servers each, interleaved)")
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="torch threads of this (worker) process; 0 = every core")
    args = parser.parse_args()
    if args.small:
        args.params, args.steps = "1M", 2
    if args.worker_threads:
        torch.set_num_threads(args.worker_threads)
    modes, shared = args.overlap.split(","), args.shared_memory.split(",")
    if not modes or not set(modes) <= {"off", "on"}:
        parser.error(f"--overlap takes off and/or on, got {args.overlap!r}")
    if not shared or not set(shared) <= {"off", "on"}:
        parser.error(f"--shared-memory takes on and/or off, got {args.shared_memory!r}")
    table = report.Table(f"step: one training step, 1 worker + {args.servers} server(s) vs no server (ms, median)",
                         ["params", "overlap", "shm", "pull", "compute", "push", "apply",
                          "shardps_step", "local_compute", "local_adam", "local_step", "ratio"])
    for size in args.params.split(","):
        torch.manual_seed(0)
        model, width = digits_mlp() if size == "digits" else mlp(report.parse_count(size))
        params = sum(p.numel() for p in model.parameters())
        x, y = torch.randn(BATCH, width), torch.randint(0, 10, (BATCH,))
        sets = {shm: procs.start_servers(args.servers, threads=1, metrics=True,
                                         extra=["--shared-memory", shm]) for shm in shared}
        try:
            phases = _measure(model, sets, x, y, modes, args)
        finally:
            procs.stop_all([s for servers in sets.values() for s in servers])
        ms = {k: report.median(v) * 1e3 for k, v in phases.items()}
        for shm in shared:
            for mode in modes:
                key = f"{mode}/{shm}"
                table.add(params=report.human(params), overlap=mode, shm=shm, pull=ms[f"{key}.pull"],
                          compute=ms[f"{key}.compute"], push=ms[f"{key}.push"],
                          apply=ms[f"{key}.apply"], shardps_step=ms[f"{key}.total"],
                          local_compute=ms["local_compute"], local_adam=ms["local_adam"],
                          local_step=ms["local_step"], ratio=ms[f"{key}.total"] / ms["local_step"])
                print(table.rows[-1], flush=True)
    report.write("step", [table], vars(args), out_dir=args.out_dir)


def _measure(model: nn.Module, sets: dict[str, list[procs.Child]], x: torch.Tensor,
             y: torch.Tensor, modes: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Steps of every mode on every set of servers and of the local baseline, interleaved:
    each phase's samples, keyed "overlap/shared-memory.phase"."""
    local = Baseline(copy.deepcopy(model))
    remotes = [Shardps(copy.deepcopy(model), servers, report.parse_bytes(args.chunk_bytes),
                       args.shards) for servers in sets.values()]
    steps = {f"{mode}/{shm}": remote.step if mode == "off" else remote.overlapped
             for shm, remote in zip(sets, remotes, strict=True) for mode in modes}
    try:
        local.step(x, y)
        for step in steps.values():  # warm-up: Adam state, buffers, connections
            step(x, y)
        phases: dict[str, list[float]] = {}
        for _ in range(args.steps):
            for mode, step in steps.items():
                for key, value in step(x, y).items():
                    phases.setdefault(f"{mode}.{key}", []).append(value)
            compute, adam = local.step(x, y)
            phases.setdefault("local_compute", []).append(compute)
            phases.setdefault("local_adam", []).append(adam)
            phases.setdefault("local_step", []).append(compute + adam)
    finally:
        for remote in remotes:
            remote.close()
    return phases


if __name__ == "__main__":
    main()
