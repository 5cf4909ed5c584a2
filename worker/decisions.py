"""The training loop's decisions, pure (no sockets, no clocks): which version a pull waits
for, where a sync worker resumes, when rank 0 evaluates, the step budget, the job's workers in
rank order, the servers' shard config, and evaluation points."""

from __future__ import annotations

from collections.abc import Sequence

from shardps.proto import common_pb2, coordinator_pb2, ps_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.states import MODE_VALUES
from shardps.worker import tasks
from shardps.worker.batches import steps_for_epochs


def pull_args(mode: str, step: int) -> dict[str, int]:
    """PSClient.pull keywords for step t: sync waits for version t, ssp presents clock t."""
    return {"min_version": step if mode == "sync" else 0, "clock": step if mode == "ssp" else 0}


def step_after_pull(mode: str, step: int, versions: Sequence[int]) -> int:
    """The step to compute after pulling `versions` for step `step`.

    In sync mode version v means rounds 0..v-1 are closed; if the servers are ahead (this
    worker joined late, or was counted out of some rounds), pushing older steps would only be
    STALE, so jump to the current round. Other modes keep their own clock.
    """
    if mode == "sync" and versions:
        return max(step, min(versions))
    return step


def is_eval_step(rank: int, step: int, eval_every: int) -> bool:
    """Rank 0 evaluates the weights pulled for step t, before pushing it, every eval_every steps."""
    return rank == 0 and step > 0 and eval_every > 0 and step % eval_every == 0


def step_budget(stop: spec_lib.StopSpec, num_train: int, batch_size: int) -> int:
    """Global steps to run: stop.max_steps and/or the steps of stop.max_epochs (the smaller if
    both); 0 means unbounded (the job ends on a target or patience verdict)."""
    budgets = [b for b in (stop["max_steps"],
                           steps_for_epochs(stop["max_epochs"], num_train, batch_size)) if b > 0]
    return min(budgets) if budgets else 0


def worker_ids(job: coordinator_pb2.JobInfo) -> list[str]:
    """Node ids of the job's live workers in rank order; ValueError unless ranks are 0..K-1.

    JobInfo.workers also lists workers the job has lost (alive = false, rank = -1).
    """
    ordered = sorted((w for w in job.workers if w.alive), key=lambda w: w.rank)
    if not ordered or [w.rank for w in ordered] != list(range(len(ordered))):
        raise ValueError(f"job {job.job_id} lists worker ranks "
                         f"{[w.rank for w in ordered]}, expected 0..K-1")
    return [w.node_id for w in ordered]


def shard_config(spec: spec_lib.JobSpec, workers: Sequence[str], epoch: int, fingerprint: str,
                 budget: int) -> ps_pb2.ShardConfig:
    """The job-wide part of every shard's config (PSClient.init fills in the per-shard fields).

    The schedule horizon defaults to the job's step budget when the spec leaves it 0.
    """
    opt = spec["optimizer"]
    sched = opt["schedule"]
    return ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(
            name=opt["name"], lr=opt["lr"], beta1=opt["betas"][0], beta2=opt["betas"][1],
            eps=opt["eps"], weight_decay=opt["weight_decay"], schedule=sched["name"],
            warmup_steps=sched["warmup_steps"], total_steps=sched["total_steps"] or budget,
            min_lr=sched["min_lr"], freeze_variance_after=opt["freeze_variance_after"],
            precondition_pushes=opt["precondition_pushes"],
            worker_momentum=opt["worker_momentum"]),
        mode=MODE_VALUES[spec["consistency"]["mode"]],
        staleness=spec["consistency"]["staleness"],
        workers=list(workers),
        epoch=epoch,
        layout_fingerprint=fingerprint,
        checkpoint_every_steps=spec["checkpoint"]["every_steps"],
        checkpoint_keep=spec["checkpoint"]["keep"],
        step_budget=budget if spec["consistency"]["mode"] == "sync" else 0,
    )


def eval_points(step: int, metrics: dict[str, float]) -> list[coordinator_pb2.EvalPoint]:
    """One EvalPoint per metric in the metrics' order (primary first), each carrying the loss."""
    return [coordinator_pb2.EvalPoint(step=step, metric=name, value=value, loss=metrics["loss"])
            for name, value in metrics.items()]


def metric_problem(spec: spec_lib.JobSpec, task: str) -> str:
    """Why the job's stop target can never be met on this task's metrics ("" if it can)."""
    target = spec["stop"]["target"]
    if target and target["metric"] not in tasks.METRICS[task]:
        return (f"stop.target.metric {target['metric']!r} is not computed for {task} datasets "
                f"(they report {', '.join(tasks.METRICS[task])})")
    return ""
