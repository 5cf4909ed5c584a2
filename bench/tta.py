"""tta: time to reach the digits target with `shardps local` (2 servers, 2 workers), against
single-process PyTorch and torch.distributed DDP over gloo with 2 worker processes.

Same job everywhere (the built-in digits spec: MLP [128, 64], batch 64 shuffled, Adam lr 1e-3,
seed 0, evaluation of the held-out split every 100 steps, target accuracy 0.97): the baselines
use shardps's own dataset, model factory, batch order and evaluation, so all three follow
the same trajectory (sync shardps = single-process Adam on the global batch). Time to target
is wall-clock from launching the command to the evaluation that reaches the target: process
start-up counts for everyone. It is split into start-up (launch to the first training step)
and training (first step to target). Runs interleave the three systems; medians.

  python -m bench.tta                   # 3 runs each
  python -m bench.tta --small           # one run each, stops at step 20 (no target)
  python -m bench.tta --local-flag=--no-fork-server   # shardps local started another way
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import report

TARGET = 0.97
EVAL_EVERY = 100
SEED = 0
BATCH = 64
LR = 1e-3
HIDDEN = [128, 64]
MAX_STEPS = 3000
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


# -- the baselines (run as `python -m bench.tta --baseline single|ddp ...`) -------------------


def train(rank: int, world: int, max_steps: int, ddp: bool) -> dict:
    """The digits job in plain PyTorch: rank r of world takes the r-th slice of each global
    batch; prints nothing, returns when the target is reached (or after max_steps)."""
    import torch

    from shardps.worker import tasks
    from shardps.worker.batches import BatchOrder
    from shardps.worker.datasets import load_dataset
    from shardps.worker.evaluate import evaluate
    from shardps.worker.models import build_model

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    data = load_dataset("digits", {}, SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", {"hidden": HIDDEN}, data.info)
    net = model
    if ddp:
        import torch.distributed as dist

        net = torch.nn.parallel.DistributedDataParallel(model)
    adam = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)
    order = BatchOrder(data.num_train, BATCH, True, SEED)
    first_step = time.time()
    step, accuracy = 0, 0.0
    while step < max_steps:
        if step > 0 and step % EVAL_EVERY == 0:  # the weights of version `step`, as shardps
            done = torch.zeros(1)
            if rank == 0:
                accuracy = evaluate(model, data)["accuracy"]
                done[0] = float(accuracy >= TARGET)
            if ddp:
                dist.broadcast(done, 0)
            if done.item():
                break
        index = order.slice(step, rank, world)
        adam.zero_grad()
        tasks.loss(data.task, net(data.train_x[index]), data.train_y[index]).backward()
        adam.step()
        step += 1
    return {"first_step": first_step, "reached": time.time(), "steps": step, "accuracy": accuracy,
            "converged": accuracy >= TARGET}


def run_baseline(args) -> None:
    if args.baseline == "ddp":
        import torch.distributed as dist

        host, port = args.store.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), args.world, is_master=False)
        dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world)
    result = train(args.rank, args.world, args.max_steps, args.baseline == "ddp")
    if args.baseline == "ddp":
        dist.destroy_process_group()
    if args.rank == 0:
        print(json.dumps(result), flush=True)
    if args.baseline == "ddp":
        # Skip the interpreter's teardown: in about one run in six gloo's threads abort it
        # ("terminate called without an active exception", SIGABRT) after the result is out.
        sys.stderr.flush()
        os._exit(0)


# -- timing each system from its launch ------------------------------------------------------


def time_single(max_steps: int) -> dict:
    launch = time.time()
    out = subprocess.run([sys.executable, "-m", "bench.tta", "--baseline", "single", "--rank", "0",
                          "--world", "1", "--max-steps", str(max_steps)],
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return _phases(launch, result["first_step"], result["reached"], time.time(), result)


def time_ddp(max_steps: int, world: int = 2) -> dict:
    import torch.distributed as dist

    # The store is this launcher's, as torchrun's agent hosts it; port 0, then ask.
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    launch = time.time()
    children = [subprocess.Popen([sys.executable, "-m", "bench.tta", "--baseline", "ddp", "--rank",
                                  str(r), "--world", str(world), "--max-steps", str(max_steps),
                                  "--store", f"127.0.0.1:{store.port}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for r in range(world)]
    outputs = [c.communicate(timeout=600) for c in children]
    end = time.time()
    del store
    if any(c.returncode for c in children):
        raise RuntimeError("DDP run failed:\n" + "\n".join(o[1][-2000:] for o in outputs))
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    return _phases(launch, result["first_step"], result["reached"], end, result)


def time_shardps(max_steps: int, flags: Sequence[str] = ()) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="bench-tta-"))
    spec = log_dir / "digits.yaml"
    from shardps.client.local import default_spec_text

    text = default_spec_text().replace("max_steps: 3000", f"max_steps: {max_steps}")
    spec.write_text(text)
    launch = time.time()
    out = subprocess.run([sys.executable, "-m", "shardps.client.cli", "local", str(spec),
                          "--output", "json", "--log-dir", str(log_dir), *flags],
                         capture_output=True, text=True, timeout=900)
    end = time.time()
    if out.returncode != 0 and '"state"' not in out.stdout:
        raise RuntimeError(f"shardps local failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout[out.stdout.index("{"):])
    reached = int(info["ended_ms"]) / 1000
    first_step = _log_time(log_dir / "worker-0.log", "initialised") or _log_time(
        log_dir / "worker-1.log", "initialised")
    marks = {
        "coordinator_up": _log_time(log_dir / "coordinator.log", "listening on", stamp_of_previous=True),
        "job_assigned": _log_time(log_dir / "coordinator.log", "assigned"),
    }
    result = {"steps": int(info["step"]), "accuracy": float(info.get("metric_value", 0.0)),
              "converged": info["state"] == "JOB_STATE_CONVERGED",
              "steps_per_s": float(info.get("steps_per_s", 0.0)),
              **{k: round(v - launch, 3) for k, v in marks.items() if v}}
    for path in log_dir.iterdir():
        path.unlink()
    log_dir.rmdir()
    return _phases(launch, first_step or reached, reached, end, result)


def _log_time(path: Path, needle: str, stamp_of_previous: bool = False) -> float | None:
    """Wall time of the first log line containing needle (or of the line before it)."""
    last = None
    for line in path.read_text().splitlines():
        m = _STAMP.match(line)
        stamp = m.group(1) if m else (last if stamp_of_previous else None)
        if needle in line and stamp:
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m:
            last = m.group(1)
    return None


def _phases(launch: float, first_step: float, reached: float, end: float, result: dict) -> dict:
    return {**result, "tta_s": reached - launch, "startup_s": first_step - launch,
            "train_s": reached - first_step, "exit_s": end - launch}


def phase_table(shardps: list[dict]) -> report.Table:
    """Where shardps local's time goes: the median time from launch of each phase's end."""
    phases = report.Table("tta: where shardps local's time goes (seconds from launch, median)",
                          ["phase", "ends_at_s", "takes_s", "what"])
    marks = [
        ("coordinator up", "coordinator_up", "client starts multiprocessing's forkserver (which starts "
                                             "importing torch) and the coordinator, waits for its address"),
        ("job assigned", "job_assigned", "the forkserver finishes importing and forks 2 servers + 2 "
                                         "workers; they register; the submitted job gets its nodes"),
        ("first step", "startup_s", "idle workers' held heartbeats return the assignment; load data and "
                                    "model; rank 0 SetLayout, InitShard, ActivateJob; rank 1's held "
                                    "GetJob returns"),
        ("target reached", "tta_s", f"{report.median([r['steps'] for r in shardps]):.0f} sync steps at "
                                    f"{report.median([r['steps_per_s'] for r in shardps]):.0f} steps/s, "
                                    "3 evaluations, the verdict"),
        ("all exited", "exit_s", "SIGTERM workers, servers, coordinator"),
    ]
    previous = 0.0
    for phase, key, what in marks:
        values = [r[key] for r in shardps if key in r]
        if not values:
            continue
        at = report.median(values)
        phases.add(phase=phase, ends_at_s=at, takes_s=at - previous, what=what)
        previous = at
    return phases


def main() -> None:
    parser = report.parser(__doc__, "one run each, 20 steps")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=MAX_STEPS)
    parser.add_argument("--local-flag", action="append", default=[], metavar="FLAG",
                        help="pass FLAG to shardps local (repeatable), e.g. --local-flag=--no-fork-server")
    parser.add_argument("--baseline", choices=["single", "ddp"], help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        run_baseline(args)
        return
    if args.small:
        args.runs, args.max_steps = 1, 20
    systems = {"shardps local (2 servers, 2 workers)": lambda steps: time_shardps(steps, args.local_flag),
               "single process": time_single,
               "DDP gloo (2 processes)": time_ddp}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    order = list(systems)
    for i in range(args.runs):
        for name in order[i % len(order):] + order[: i % len(order)]:
            runs[name].append(systems[name](args.max_steps))
            print(name, json.dumps(runs[name][-1]), flush=True)
    table = report.Table(f"tta: digits to accuracy {TARGET} (seconds, median of {args.runs})",
                         ["system", "tta_s", "startup_s", "train_s", "steps", "accuracy", "converged",
                          "vs_ddp"])
    ddp = report.median([r["tta_s"] for r in runs["DDP gloo (2 processes)"]])
    for name, results in runs.items():
        tta = report.median([r["tta_s"] for r in results])
        table.add(system=name, tta_s=tta, startup_s=report.median([r["startup_s"] for r in results]),
                  train_s=report.median([r["train_s"] for r in results]),
                  steps=int(report.median([r["steps"] for r in results])),
                  accuracy=report.median([r["accuracy"] for r in results]),
                  converged=all(r["converged"] for r in results), vs_ddp=tta / ddp)
    phases = phase_table(runs["shardps local (2 servers, 2 workers)"])
    report.write("tta", [table, phases], vars(args), extra={"runs": runs}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
