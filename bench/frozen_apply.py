"""frozen_apply: one shard's frozen-variance Adam step (optimizer.freeze_variance_after), with
and without preconditioned pushes and with the workers' momentum (optimizer.worker_momentum:
the shard steps w -= lr u), against plain Adam on the same shard.

Times the server's Updater.step in this process on 1 torch thread (as the server runs it): a
sync round's two workers' gradients, their weighted mean and the step, after the freeze.
What a frozen step costs beyond plain Adam is its unfused passes; before the denominator was
cached, also a sqrt and a mean over the shard every step, and before 24fed1d the round's
gradient formed whole in a fresh tensor.

  python -m bench.frozen_apply                 # 10M elements, 10 timed steps per kind
  python -m bench.frozen_apply --small
"""

from __future__ import annotations

import time

import torch

from bench import report
from shardps.proto import common_pb2
from shardps.server.ps.updater import Updater

WARMUP = 2  # plain steps before the freeze
KINDS = {"plain adam": (0, False, False), "frozen": (WARMUP, False, False),
         "frozen, preconditioned": (WARMUP, True, False), "frozen, worker momentum": (WARMUP, True, True)}


def _updater(params: int, after: int, precondition: bool, momentum: bool) -> Updater:
    config = common_pb2.OptimizerConfig(name="adam", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8,
                                        freeze_variance_after=after, precondition_pushes=precondition,
                                        worker_momentum=momentum)
    return Updater(config, torch.zeros(params))


def main() -> None:
    parser = report.parser(__doc__, "1M, 3 steps")
    parser.add_argument("--params", default="10M")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per kind")
    args = parser.parse_args()
    if args.small:
        args.params, args.steps = "1M", 3
    torch.set_num_threads(1)  # as the server
    table = report.Table("frozen_apply: one sync round's step (2 workers) on one shard",
                         ["params", "kind", "step_ms", "vs_plain"])
    for params in map(report.parse_count, args.params.split(",")):
        grads = [torch.randn(params) * 1e-3 for _ in range(2)]
        updaters = {kind: _updater(params, *how) for kind, how in KINDS.items()}
        times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for step in range(WARMUP + 1 + args.steps):  # interleaved: the same load for each kind
            for kind, updater in updaters.items():
                start = time.perf_counter()
                updater.step([(g, 0.5) for g in grads], 1e-4)
                if step > WARMUP:  # the first frozen step (untimed) may compute what is cached
                    times[kind].append(time.perf_counter() - start)
        plain = report.median(times["plain adam"])
        for kind, seconds in times.items():
            median = report.median(seconds)
            table.add(params=report.human(params), kind=kind, step_ms=median * 1e3,
                      vs_plain=median / plain)
            print(table.rows[-1], flush=True)
    report.write("frozen_apply", [table], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
