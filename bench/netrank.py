"""One worker process of bench.net, run inside its emulated host: a DDP rank over gloo (with
an optional comm hook), or a shardps worker against standalone servers. It times steady-state
steps and prints one JSON line: median step seconds and the bytes its link carried per step
(both directions, read from the namespace's own eth0 counters, so headers and acks count).

  python -m bench.netrank ddp --rank R --world W --store HOST:PORT --hook none|fp16|powersgd
  python -m bench.netrank ps-init --servers A,B        # creates the shards, then exits
  python -m bench.netrank ps --rank R --world W --servers A,B
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bench import procs
from bench.step import mlp

BATCH = 32
JOB = "bench-net"
DEVICE = "eth0"


def link_bytes() -> int:
    """Bytes sent plus received on this namespace's eth0 so far."""
    stats = Path("/sys/class/net") / DEVICE / "statistics"
    return int((stats / "tx_bytes").read_text()) + int((stats / "rx_bytes").read_text())


def quiescent_link_bytes(still_s: float = 0.2, limit_s: float = 10.0) -> int:
    """link_bytes once the counters have not moved for still_s (replies and acks still on
    the wire have landed), or after limit_s at most."""
    deadline = time.monotonic() + limit_s
    last, since = link_bytes(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = link_bytes()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= still_s:
            break
    return last


def timed(step: Callable[[], None], warmup: int, steps: int,
          drain: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per step and link bytes per step over `steps` steps after `warmup`.

    Both ends of the byte window are quiescent: a sync shardps step leaves its next pull's
    reply in flight behind the push, so without waiting a pull more or less landed in the
    window (3 timed steps: 0.62 vs 0.79 MB for the same traffic). `drain`, where given, reads
    that last reply before the window closes (the next step would have read it first)."""
    for _ in range(warmup):
        step()
    before, seconds, cpu = quiescent_link_bytes(), [], time.process_time()
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    if drain is not None:
        drain()
    return {"step_s": statistics.median(seconds), "bytes_per_step": (quiescent_link_bytes() - before) / steps,
            "cpu_s_per_step": cpu / steps}


def model_and_batch(params: int, rank: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)  # every rank the same initial weights
    model, width = mlp(params)
    g = torch.Generator().manual_seed(rank + 1)
    return model, torch.randn(BATCH, width, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def run_ddp(args: argparse.Namespace) -> dict[str, float]:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    host, port = args.store.rsplit(":", 1)
    if args.rank == 0:  # rank 0 hosts the rendezvous store: port 0, then say which
        store = dist.TCPStore(host, 0, args.world, is_master=True, wait_for_workers=False, timeout=_timeout(args))
        print(f"listening on {host}:{store.port}", flush=True)
    else:
        store = dist.TCPStore(host, int(port), args.world, is_master=False, timeout=_timeout(args))
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world, timeout=_timeout(args))
    model, x, y = model_and_batch(args.params, args.rank)
    # powerSGD_hook chains two all-reduces per bucket through futures; with several buckets
    # in flight gloo saw them in different orders on the two ranks and aborted ("Received data
    # size doesn't match", 10M parameters = 2 buckets), so its run uses one bucket.
    bucket_mb = 4096.0 if args.hook == "powersgd" else 25.0
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
    warmup = args.warmup
    if args.hook == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif args.hook == "powersgd":
        # Rank 1 (the cheapest), compressing from the first step after warm-up; the hook runs
        # plain all-reduce for the first start_powerSGD_iter iterations (>= 2 required).
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                       start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, powersgd.powerSGD_hook)
        warmup = max(warmup, 3)
    adam = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        adam.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        adam.step()

    result = timed(step, warmup, args.steps)
    dist.barrier()
    return result


def _timeout(args: argparse.Namespace):
    import datetime

    return datetime.timedelta(seconds=args.timeout)


def _ps_client(args: argparse.Namespace, flat_numel: int, worker: str):
    from shardps.psclient import PSClient

    smap = procs.shard_map(args.servers.split(","), flat_numel)
    return PSClient(JOB, smap, worker_id=worker, compress_pull=args.compress_pull)


def run_ps_init(args: argparse.Namespace) -> dict[str, float]:
    from shardps.proto import common_pb2, ps_pb2
    from shardps.worker.flat import FlatParams

    model, _, _ = model_and_batch(args.params, 0)
    flat = FlatParams(model)
    momentum = {"freeze_variance_after": _freeze(args), "precondition_pushes": True, "worker_momentum": True} \
        if args.worker_momentum else {}
    with _ps_client(args, flat.numel, "init") as ps:
        ps.init(flat.weights_cpu(), ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                                 **momentum),
            mode=common_pb2.CONSISTENCY_SYNC, workers=[f"w{r}" for r in range(args.world)], epoch=1,
            layout_fingerprint="bench-net"))
    return {"params": float(flat.numel)}


def _freeze(args: argparse.Namespace) -> int:
    """optimizer.freeze_variance_after with --worker-momentum: the last warm-up step is the
    first frozen one, so the one-off read of the servers' denominators (GetPreconditioner,
    4 bytes a parameter) stays out of the timed window."""
    return max(1, args.warmup - 1)


def run_ps(args: argparse.Namespace) -> dict[str, float]:
    from shardps.proto import common_pb2, ps_pb2
    from shardps.worker.flat import FlatParams
    from shardps.worker.metrics import WorkerMetrics
    from shardps.worker.wirepush import WirePush

    model, x, y = model_and_batch(args.params, args.rank)
    flat = FlatParams(model)
    ps = _ps_client(args, flat.numel, f"w{args.rank}")
    # As a worker with transport.compress does (worker/shards.py); with --worker-momentum the
    # warm-up steps push dense and the timed ones the workers' momentum of g / D.
    wire = WirePush(args.compress, common_pb2.DTYPE_FLOAT32, JOB, WorkerMetrics(),
                    warmup_steps=_freeze(args) if args.worker_momentum else 0,
                    precondition=args.worker_momentum, momentum_beta1=0.9 if args.worker_momentum else None)
    version = 0

    def step() -> None:  # as a sync worker does: pull, compute, push with the next pull behind it
        nonlocal version
        result = ps.pull(flat.host_weights, min_version=version, timeout_s=args.timeout)
        if not result.ready:
            raise RuntimeError(f"version {version} not ready within {args.timeout}s")
        flat.upload()
        flat.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = flat.host_grad()
        encoded = wire.encode(grad, ps.shards, version, ps.preconditioners)
        replies = ps.push(grad, step=version, base_version=version, batch_size=BATCH,
                          then_pull={"min_version": version + 1, "timeout_s": args.timeout},
                          encoded=encoded)
        # The first of the two pushes of a round is accepted, the last one closes it (applied).
        if not all(r.status in (ps_pb2.PUSH_STATUS_ACCEPTED, ps_pb2.PUSH_STATUS_APPLIED) for r in replies):
            raise RuntimeError(f"push not applied: {replies}")
        version += 1

    overlapped = OverlappedStep(ps, model, flat, x, y, args.timeout) if args.overlap else None

    def drain() -> None:  # the pull the last push sent ahead, read as the next step would
        next_version = overlapped.version if overlapped is not None else version
        if not ps.pull(flat.host_weights, min_version=next_version, timeout_s=args.timeout).ready:
            raise RuntimeError(f"version {next_version} not ready within {args.timeout}s")

    try:
        return timed(overlapped or step, args.warmup, args.steps, drain)
    finally:
        ps.close()


class OverlappedStep:
    """Steps as a worker with transport.overlap takes them (worker/overlap.py): the forward on
    weights as they land, each bucket pushed as backward finishes it."""

    def __init__(self, ps, model: nn.Module, flat, x: torch.Tensor, y: torch.Tensor,
                 timeout: float):
        from shardps.worker.overlap import Overlap

        self.ps, self.model, self.flat, self.x, self.y = ps, model, flat, x, y
        self.timeout = timeout
        self.hooks = Overlap(model, flat.layout)
        self.version = 0

    def __call__(self) -> None:
        from shardps.proto import ps_pb2

        ps, hooks, version = self.ps, self.hooks, self.version
        inflight = ps.start_pull(self.flat.host_weights, min_version=version, timeout_s=self.timeout)
        if not inflight.heads()[0]:
            raise RuntimeError(f"version {version} not ready within {self.timeout}s")
        hooks.arm_pull(inflight)
        try:
            out = self.model(self.x)
        finally:
            hooks.disarm_pull()
        inflight.finish()
        self.flat.zero_grad()
        loss = nn.functional.cross_entropy(out, self.y)
        push = ps.begin_push(self.flat.grad, step=version, base_version=version, batch_size=BATCH,
                             buckets=hooks.buckets,
                             then_pull={"min_version": version + 1, "timeout_s": self.timeout})
        hooks.arm_push(push)
        try:
            loss.backward()
        finally:
            hooks.disarm_push()
        replies = push.finish()
        if not all(r.status in (ps_pb2.PUSH_STATUS_ACCEPTED, ps_pb2.PUSH_STATUS_APPLIED) for r in replies):
            raise RuntimeError(f"push not applied: {replies}")
        self.version += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["ddp", "ps-init", "ps"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any one wait may take")
    parser.add_argument("--store", default="", help="ddp: HOST:PORT of rank 0's store (port ignored on rank 0)")
    parser.add_argument("--hook", choices=["none", "fp16", "powersgd"], default="none")
    parser.add_argument("--servers", default="", help="ps: the servers' HOST:PORT, comma-separated")
    parser.add_argument("--compress", default="none", help="ps: transport.compress (pushes)")
    parser.add_argument("--compress-pull", default="none", help="ps: transport.compress_pull")
    parser.add_argument("--overlap", action="store_true", help="ps: transport.overlap (fp32)")
    parser.add_argument("--worker-momentum", action="store_true",
                        help="ps: optimizer.worker_momentum (and precondition_pushes, freeze_variance_after "
                             "= --warmup - 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = {"ddp": run_ddp, "ps-init": run_ps_init, "ps": run_ps}[args.role]
    print(json.dumps(run(args)), flush=True)
    sys.stdout.flush()
    # gloo's threads can abort the interpreter's teardown after the result is out (bench.tta).
    os._exit(0)


if __name__ == "__main__":
    main()
