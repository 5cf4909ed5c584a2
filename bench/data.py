"""data: a training step reading its batches from shard files (streamed, read ahead) against the
same step with the same rows held in memory; and, with --bounded, a worker's resident memory
while it trains an epoch over a log several times larger than a limit.

Overlap (the default): one process generates a click log (`shardps data ctr`), then trains the
`dlrm` model of examples/dlrm.yaml (forward, backward, Adam) on it twice per round: once taking
each batch from a `FileSource` (rank 0 of 1: its files streamed by `FileBatchStream` on a
reader thread, `prefetch` ahead), once taking the same batches, in the same order, from a list
that holds every row of the epoch in memory (built from one pass of the same source before the
clock starts: the same rows, none reused). Both models start from the same weights. Rounds
alternate which goes first; the first `--warmup` steps of each pass are not counted; medians.

Bounded (--bounded): writes a log of `--log-mib`, starts a local cluster (a coordinator,
`--servers`, `--workers` as fresh processes), trains one epoch of a sync dlrm job over the log
and samples each worker's VmRSS and VmHWM from /proc while it runs.

  python -m bench.data                  # 200,000 rows in 8 files, 3 rounds of one epoch each
  python -m bench.data --bounded --files 16   # 2 GiB log, 2 workers, batch 8192, limit 512 MiB each
  python -m bench.data --small          # 6000 rows, a few steps (what CI runs)
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench import report
from shardps.client import ctrdata
from shardps.proto import records
from shardps.proto import spec as spec_lib
from shardps.worker import batchsource, tasks
from shardps.worker.batchsource import Batch
from shardps.worker.models import build_model

MODEL_KWARGS = {"buckets": 1024, "dim": 8, "bottom": [32], "top": [64, 32]}  # examples/dlrm.yaml
SEED = 7


def data_spec(path: Path, batch: int, prefetch: int) -> Any:
    raw = {"model": {"name": "dlrm"}, "stop": {"max_steps": 1},
           "data": {"dataset": "files", "batch_size": batch, "shuffle": True,
                    "files": {"path": str(path), "holdout": 1, "prefetch": prefetch}}}
    return spec_lib.validate(raw)["data"]


class Trainer:
    """The dlrm model and its Adam, one step at a time, timed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.adam = torch.optim.Adam(model.parameters(), lr=0.003)

    def step(self, batch: Batch) -> None:
        self.adam.zero_grad()
        tasks.loss("binary", self.model(*batch.inputs), batch.target).backward()
        self.adam.step()


def timed_pass(trainer: Trainer, take, steps: int) -> tuple[list[float], list[float]]:
    """(step seconds, seconds spent taking the batch) for `steps` steps."""
    step_s, take_s = [], []
    for t in range(steps):
        t0 = time.perf_counter()
        batch = take(t)
        t1 = time.perf_counter()
        trainer.step(batch)
        step_s.append(time.perf_counter() - t0)
        take_s.append(t1 - t0)
    return step_s, take_s


def overlap(args, workdir: Path) -> report.Table:
    log = workdir / "ctr"
    summary = ctrdata.write_ctr(log, args.rows, args.files, SEED)
    spec = data_spec(log, args.batch, args.prefetch)
    data = batchsource.load_data(spec, SEED)
    steps = math.ceil(data.num_train / args.batch)  # one epoch of rank 0 of 1
    if args.steps:
        steps = min(steps, args.steps)
    warm = batchsource.open_source(data, spec, SEED)
    held = [warm.take(t, 0, 1) for t in range(steps)]  # every row of the pass, in memory
    warm.close()
    torch.manual_seed(0)
    model = build_model("dlrm", MODEL_KWARGS, data.info)
    trainers = {"files": Trainer(copy.deepcopy(model)), "memory": Trainer(copy.deepcopy(model))}
    times: dict[str, list[float]] = {"files": [], "memory": []}
    takes: dict[str, list[float]] = {"files": [], "memory": []}
    max_ahead = 0
    for round_ in range(args.rounds):
        for mode in (("files", "memory") if round_ % 2 == 0 else ("memory", "files")):
            if mode == "files":
                source = batchsource.open_source(data, spec, SEED)
                try:
                    step_s, take_s = timed_pass(trainers[mode], lambda t, s=source: s.take(t, 0, 1), steps)
                finally:
                    source.close()
                max_ahead = max(max_ahead, source.max_ahead)
            else:
                step_s, take_s = timed_pass(trainers[mode], held.__getitem__, steps)
            times[mode] += step_s[args.warmup:]
            takes[mode] += take_s[args.warmup:]
    ms = {m: report.median(v) * 1e3 for m, v in times.items()}
    table = report.Table(f"data: dlrm step from files vs the same rows in memory (ms, median of "
                         f"{len(times['files'])} steps each)",
                         ["rows", "log_MiB", "batch", "prefetch", "files_step", "memory_step",
                          "files_take", "memory_take", "ratio", "max_ahead"])
    table.add(rows=args.rows, log_MiB=round(summary.nbytes / 2**20, 1), batch=args.batch, prefetch=args.prefetch,
              files_step=ms["files"], memory_step=ms["memory"],
              files_take=report.median(takes["files"]) * 1e3, memory_take=report.median(takes["memory"]) * 1e3,
              ratio=ms["files"] / ms["memory"], max_ahead=max_ahead)
    return table


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:  # it exited between samples
        pass
    return 0


class RssSampler:
    """Samples VmRSS and VmHWM of some processes every `interval_s` on a thread; keeps the most."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.1):
        self.pids = pids
        self.max_rss = dict.fromkeys(pids, 0)
        self.hwm = dict.fromkeys(pids, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            self.max_rss[name] = max(self.max_rss[name], _status_kib(pid, "VmRSS") * 1024)
            self.hwm[name] = max(self.hwm[name], _status_kib(pid, "VmHWM") * 1024)
        self.samples += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def bounded(args, workdir: Path) -> report.Table:
    from shardps.client.api import CoordinatorClient
    from shardps.client.local import LocalCluster
    from shardps.proto.states import state_name

    rows = max(args.files * 64, int(args.log_mib * 2**20) // records.CTR_RECORD.itemsize)
    log = workdir / "ctr"
    t0 = time.monotonic()
    summary = ctrdata.write_ctr(log, rows, args.files, SEED)
    print(f"wrote {summary.nbytes / 2**20:.0f} MiB ({rows} rows, {args.files} files) in "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    spec = {"name": "bench-data-bounded", "seed": 0, "model": {"name": "dlrm", "kwargs": MODEL_KWARGS},
            "data": {"dataset": "files", "batch_size": args.bounded_batch, "shuffle": True,
                     "files": {"path": str(log), "format": "ctr", "holdout": 1, "prefetch": args.prefetch}},
            "optimizer": {"lr": 0.003}, "consistency": {"mode": "sync"},
            "cluster": {"servers": args.servers, "workers": args.workers},
            "stop": {"max_epochs": 1, "eval_every": 10**9}}
    (workdir / "logs").mkdir()
    cluster = LocalCluster(args.servers, args.workers, workdir / "logs", lease_ms=30000, fork_server=False)
    try:
        address = cluster.start()
        sampler = RssSampler({c.name: c.pid for c in cluster.children if c.name.startswith("worker-")})
        started = time.monotonic()
        with CoordinatorClient(address) as client:
            job = client.submit(yaml.safe_dump(spec))
            info = client.wait(job, timeout_s=args.timeout)
        sampler.sample()
        sampler.stop()
        elapsed = time.monotonic() - started
    finally:
        cluster.stop()
    table = report.Table("data --bounded: each worker's resident memory over one epoch of a log larger "
                         "than its limit (MiB)", ["worker", "log_MiB", "limit_MiB", "max_rss", "peak_hwm",
                                                   "within", "steps", "train_s", "state", "samples"])
    for name in sorted(sampler.hwm):
        peak = max(sampler.hwm[name], sampler.max_rss[name]) / 2**20
        table.add(worker=name, log_MiB=round(summary.nbytes / 2**20), limit_MiB=args.limit_mib,
                  max_rss=round(sampler.max_rss[name] / 2**20), peak_hwm=round(peak),
                  within=peak <= args.limit_mib, steps=info.step, train_s=round(elapsed, 1),
                  state=state_name(info.state), samples=sampler.samples)
    return table


def main() -> None:
    parser = report.parser(__doc__, "6000 rows, 3 files, 20 steps; --bounded: a 4 MiB log")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="steps a pass (0: one epoch)")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each pass not counted")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--bounded", action="store_true", help="the memory run instead (see above)")
    parser.add_argument("--log-mib", type=float, default=2048)
    parser.add_argument("--limit-mib", type=int, default=512, help="each worker's RSS limit")
    parser.add_argument("--bounded-batch", type=int, default=8192, help="the global batch of --bounded")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        args.rows, args.files, args.steps, args.warmup, args.rounds = 6000, 3, 20, 2, 2
        args.log_mib, args.bounded_batch = 4, 256
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=os.environ.get("BENCH_DATA_DIR")) as tmp:
        if args.bounded:
            report.write("data", [bounded(args, Path(tmp))], vars(args), out_dir=args.out_dir)
        else:
            report.write("data", [overlap(args, Path(tmp))], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
