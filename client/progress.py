"""Renders jobs and nodes for the CLI (one-line progress, live progress, tables, job detail,
JSON)."""

from __future__ import annotations

import sys
import time

from google.protobuf import json_format

from shardps.proto import common_pb2, coordinator_pb2
from shardps.proto.states import FINAL_STATES, state_name

_BLOCKS = "▁▂▃▄▅▆▇█"


def progress_line(job: coordinator_pb2.JobInfo) -> str:
    """`job-id RUNNING step 420/3000 loss 0.1234 accuracy 0.9611 (best 0.9611 @400) 35.2 steps/s`."""
    parts = [job.job_id, state_name(job.state)]
    parts.append(f"step {job.step}/{job.max_steps}" if job.max_steps else f"step {job.step}")
    if job.step or job.loss:
        parts.append(f"loss {job.loss:.4f}")
    if job.has_eval:
        parts.append(f"{job.metric} {job.metric_value:.4f} (best {job.best_metric:.4f} @{job.best_step})")
    if job.steps_per_s:
        parts.append(f"{job.steps_per_s:.1f} steps/s")
    if job.reason and job.state != common_pb2.JOB_STATE_RUNNING:
        parts.append(f"- {job.reason}")
    return "  ".join(parts)


class Live:
    """Prints progress lines: rewritten in place on a terminal, one per change otherwise."""

    def __init__(self, stream=sys.stdout, min_interval_s: float = 1.0):
        self.stream = stream
        self.tty = stream.isatty()
        self.min_interval_s = min_interval_s
        self._last = ""
        self._last_time = 0.0

    def update(self, job) -> None:
        line = progress_line(job)
        now = time.monotonic()
        final = job.state in FINAL_STATES
        if line == self._last or (not final and not self.tty and now - self._last_time < self.min_interval_s):
            return
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last, self._last_time = line, now


def to_json(message) -> dict:
    """A protobuf message as the CLI's JSON output shows it (field names as in the .proto)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line chart of values (downsampled to width)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [values[int(i * step)] for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int((v - lo) / span * len(_BLOCKS)))] for v in values)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def jobs_table(jobs: list[coordinator_pb2.JobInfo]) -> str:
    rows = []
    for j in jobs:
        metric = f"{j.metric} {j.metric_value:.4f}" if j.has_eval else "-"
        rows.append([j.job_id, state_name(j.state), f"{j.step}", f"{j.loss:.4f}" if j.step else "-",
                     metric, j.reason or ""])
    return table(["JOB", "STATE", "STEP", "LOSS", "METRIC", "REASON"], rows)


def job_detail(job: coordinator_pb2.JobInfo) -> str:
    lines = [
        f"job        {job.job_id} ({job.name})",
        f"state      {state_name(job.state)}" + (f": {job.reason}" if job.reason else ""),
        f"step       {job.step}" + (f" / {job.max_steps}" if job.max_steps else ""),
        f"loss       {job.loss:.4f}" if job.step else "loss       -",
    ]
    if job.has_eval:
        lines.append(f"{job.metric:<10} {job.metric_value:.4f} (best {job.best_metric:.4f} at step {job.best_step})")
    lines.append(f"rate       {job.steps_per_s:.1f} steps/s, {job.samples} samples")
    if job.resume_from:
        lines.append(f"resumes    {job.resume_from}")
    if job.rollback_id:
        lines.append(f"rollbacks  {job.rollback_id} (a server restored a checkpoint; last back "
                     f"to version {job.rollback_version}, steps since replayed)")
    lines += reshard_lines(job.reshard)
    if job.losses:
        curve = [p.loss for p in job.losses]
        lines.append(f"loss curve {sparkline(curve)}  {curve[0]:.3f} -> {curve[-1]:.3f}")
    if job.evals:
        primary = [e.value for e in job.evals if e.metric == job.metric]
        if primary:
            lines.append(f"{job.metric[:10]:<10} {sparkline(primary)}  {primary[0]:.3f} -> {primary[-1]:.3f}")
    if job.workers:
        lines.append("")
        lines.append(table(["WORKER", "RANK", "STEP", "LOSS", "STEPS/S", "ALIVE"], [
            [w.node_id, str(w.rank), str(w.step), f"{w.loss:.4f}", f"{w.steps_per_s:.1f}",
             "yes" if w.alive else "no"] for w in job.workers]))
    if job.shard_map.shards:
        lines.append("")
        header = ["SHARD", "SERVER", "ADDRESS", "OFFSET", "LENGTH"]
        rows = [[str(s.index), s.server_id, s.address, str(s.offset), str(s.length)]
                for s in job.shard_map.shards]
        if any(s.replica_epoch for s in job.shard_map.shards):  # replicated: primary first
            header += ["BACKUPS", "EPOCH"]
            for row, s in zip(rows, job.shard_map.shards, strict=True):
                copies = [*s.backup_ids, *(f"{j}(joining)" for j in s.joining_ids)]
                row += [",".join(copies) or "-", str(s.replica_epoch)]
        lines.append(table(header, rows))
    return "\n".join(lines)


def reshard_lines(reshard: coordinator_pb2.ReshardProgress) -> list[str]:
    """The latest reshard of a job (none if it was never resharded): its state, servers,
    moves done, and each move not done yet."""
    if reshard.state == coordinator_pb2.RESHARD_STATE_UNSPECIFIED:
        return []
    state = coordinator_pb2.ReshardState.Name(reshard.state).removeprefix("RESHARD_STATE_")
    lines = [f"reshard    {state.lower()}: {len(reshard.servers_before)} -> "
             f"{len(reshard.servers_after)} servers, {reshard.moves_done} of "
             f"{reshard.moves_total} moves done in {reshard.elapsed_ms / 1000:.1f} s"
             + (f" ({reshard.message})" if reshard.message else "")]
    lines += [f"           shard {m.shard_index} {m.source} -> {m.target}: {m.phase}"
              for m in reshard.moves if m.phase != "done"]
    return lines


def nodes_table(nodes: list[coordinator_pb2.NodeInfo]) -> str:
    rows = []
    for n in sorted(nodes, key=lambda n: (n.role, n.node_id)):
        role = common_pb2.Role.Name(n.role).removeprefix("ROLE_").lower()
        state = coordinator_pb2.NodeState.Name(n.state).removeprefix("NODE_STATE_").lower()
        work = n.job_id if n.role == common_pb2.ROLE_WORKER else ",".join(n.jobs)
        rows.append([n.node_id, role, state, n.address, n.device or "-", work or "-",
                     f"{n.last_seen_ms_ago / 1000:.1f}s"])
    return table(["NODE", "ROLE", "STATE", "ADDRESS", "DEVICE", "JOBS", "SEEN"], rows)
