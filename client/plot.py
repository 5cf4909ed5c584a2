"""`shardps plot`: a job's loss and evaluation curves as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from shardps.client.api import ClientError
from shardps.proto import coordinator_pb2
from shardps.proto.states import state_name


def plot_job(job: coordinator_pb2.JobInfo, path: Path) -> None:
    """Writes the training loss (and each evaluated metric) against step to `path`.

    Raises ClientError if the job has no history yet or matplotlib is missing.
    """
    if not job.losses and not job.evals:
        raise ClientError(f"job {job.job_id} has no history to plot yet")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ClientError("plot needs matplotlib: pip install matplotlib", usage=True) from None
    metrics = sorted({e.metric for e in job.evals}, key=lambda m: (m != job.metric, m))
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5.5 * (1 + len(metrics)), 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([p.step for p in job.losses], [p.loss for p in job.losses], lw=1, label="train loss")
    held_out = [e for e in job.evals if e.metric == job.metric]
    if held_out:
        ax.plot([e.step for e in held_out], [e.loss for e in held_out], "o-", ms=3, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if job.losses and min(p.loss for p in job.losses) > 0 else "linear")
    ax.legend()
    ax.grid(alpha=0.3)
    for ax, metric in zip(axes[0][1:], metrics, strict=True):
        points = [e for e in job.evals if e.metric == metric]
        ax.plot([e.step for e in points], [e.value for e in points], "o-", ms=3, color="tab:green")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{job.job_id} - {state_name(job.state)}" + (f": {job.reason}" if job.reason else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
