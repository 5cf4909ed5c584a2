"""apply: server-side Adam through the real push path vs fused torch.optim.Adam in one process.

A real `shardps-server` (1 torch thread, as `shardps local` runs it) receives pushes from the
real PSClient; its apply time per push comes from its own metrics (shardps_ps_apply_seconds:
from the received gradient to the updated weights, i.e. the lock, the sync mean and Adam; the
finite check runs as chunks arrive). The baseline is `torch.optim.Adam(fused=True)` on a tensor
of the same size in this process, on 1 thread, plus the same weighted mean for sync rounds.
Steps alternate between the two (after a warm-up that allocates Adam's state) and each
side reports its median; end-to-end push time (wire included) is reported alongside.

  python -m bench.apply                 # 10M and 100M, async (1 worker) and sync (2 workers)
  python -m bench.apply --small
"""

from __future__ import annotations

import time

import torch

from bench import procs, report
from shardps.proto import common_pb2, ps_pb2
from shardps.psclient import PSClient

JOB = "bench-apply"
MODES = {"async": (common_pb2.CONSISTENCY_ASYNC, ["w0"]),
         "sync": (common_pb2.CONSISTENCY_SYNC, ["w0", "w1"])}


class InProcess:
    """Fused Adam on `params` fp32 elements in this process (after the shard's weighted mean
    when `workers` > 1); `step()` returns the seconds of one step."""

    def __init__(self, params: int, workers: int):
        self.workers = workers
        self.weights = torch.zeros(params)
        self.grads = [torch.randn(params) * 1e-3 for _ in range(workers)]
        self.scratch = torch.empty(params)
        self.adam = torch.optim.Adam([self.weights], lr=1e-4, fused=True)
        self.step()  # allocates m and v

    def step(self) -> float:
        if self.workers > 1:  # untimed: restore the first contribution, which the mean scales in place
            self.scratch.copy_(self.grads[0])
        start = time.perf_counter()
        if self.workers == 1:
            self.weights.grad = self.grads[0]
        else:  # what the shard does: the first contribution scaled in place, the rest added
            grad = self.scratch.mul_(1 / self.workers)
            for g in self.grads[1:]:
                grad.add_(g, alpha=1 / self.workers)
            self.weights.grad = grad
        self.adam.step()
        return time.perf_counter() - start


class ThroughServer:
    """One real server and the job's workers' PSClients; `step()` pushes one round and returns
    (server apply seconds from its metrics, seconds of the round-closing push end to end)."""

    def __init__(self, params: int, mode: str):
        consistency, workers = MODES[mode]
        self.grad = torch.randn(params) * 1e-3
        self.server = procs.start_servers(1, threads=1, metrics=True)[0]
        smap = procs.shard_map([self.server.address], params)
        self.clients = [PSClient(JOB, smap, worker_id=w) for w in workers]
        self.clients[0].init(torch.zeros(params), ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8),
            mode=consistency, workers=workers, epoch=1, layout_fingerprint="bench"))
        self.version = 0
        self.step()  # allocates m and v

    def step(self) -> tuple[float, float]:
        for client in self.clients[:-1]:
            client.push(self.grad, step=self.version, base_version=self.version, batch_size=1)
        before = self.server.metric("shardps_ps_apply_seconds_sum")
        start = time.perf_counter()
        replies = self.clients[-1].push(self.grad, step=self.version, base_version=self.version,
                                        batch_size=1)
        push = time.perf_counter() - start
        applied = self.server.metric("shardps_ps_apply_seconds_sum") - before
        assert replies[0].status == ps_pb2.PUSH_STATUS_APPLIED, replies
        self.version += 1
        return applied, push

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.stop()


def main() -> None:
    parser = report.parser(__doc__, "1M, 3 steps")
    parser.add_argument("--params", default="10M,100M")
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    args = parser.parse_args()
    if args.small:
        args.params, args.steps = "1M", 3
    torch.set_num_threads(1)  # as the server
    table = report.Table("apply: Adam updates per second, server push path vs in-process fused Adam",
                         ["params", "mode", "torch_ms", "server_apply_ms", "ratio", "torch_Mparam_s",
                          "server_Mparam_s", "push_ms_e2e", "e2e_Mparam_s"])
    for params in map(report.parse_count, args.params.split(",")):
        for mode in args.modes.split(","):
            workers = len(MODES[mode][1])
            server = ThroughServer(params, mode)
            local = InProcess(params, workers)
            torch_s, apply_s, push_s = [], [], []
            try:
                for _ in range(args.steps):  # interleaved, so both see the same machine load
                    torch_s.append(local.step())
                    applied, pushed = server.step()
                    apply_s.append(applied)
                    push_s.append(pushed)
            finally:
                server.close()
            base, apply, push = (report.median(v) for v in (torch_s, apply_s, push_s))
            table.add(params=report.human(params), mode=f"{mode} ({workers}w)", torch_ms=base * 1e3,
                      server_apply_ms=apply * 1e3, ratio=base / apply,
                      torch_Mparam_s=params / base / 1e6, server_Mparam_s=params / apply / 1e6,
                      push_ms_e2e=push * 1e3, e2e_Mparam_s=params / push / 1e6)
            print(table.rows[-1], flush=True)
    report.write("apply", [table], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
