"""`shardps watch` on a terminal: a live multi-line view of one job.

A progress bar to the stop condition, loss and metric sparklines, steps/s, each worker's
rate with the straggler marked, and each server's load (pushes applied per second, read from
the servers themselves). Off a terminal, `watch` prints one progress line per change instead.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field

import grpc
import yaml

from shardps.client import progress
from shardps.client.api import CoordinatorClient
from shardps.proto import coordinator_pb2, ps_pb2, ps_pb2_grpc
from shardps.proto.states import FINAL_STATES, state_name
from shardps.runtime import rpc

BAR_WIDTH = 40
REPORT_NOISE_S = 1.0


@dataclass
class ServerLoad:
    """Pushes applied per second on one server, from two successive GetShardInfo samples."""

    server_id: str
    address: str
    shards: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    pushes: int = 0
    rate: float = 0.0
    error: str = ""


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(fraction * width)
    return "█" * full + "░" * (width - full)


def stop_fraction(job: coordinator_pb2.JobInfo, target: float | None) -> tuple[float, str]:
    """How far the job is toward its stop condition, and a label saying which one."""
    if job.max_steps:
        return job.step / job.max_steps, f"{job.step}/{job.max_steps} steps"
    if target and job.has_eval and target > 0:
        return job.best_metric / target, f"{job.metric} {job.best_metric:.4f} of {target:g}"
    return 0.0, f"{job.step} steps"


def render(job: coordinator_pb2.JobInfo, loads: list[ServerLoad], width: int = 100) -> list[str]:
    """The lines of the view (pure: the same inputs draw the same screen)."""
    spec = yaml.safe_load(job.spec_yaml) if job.spec_yaml else {}
    stop = spec.get("stop") or {}
    target = (stop.get("target") or {}).get("value")
    mode = (spec.get("consistency") or {}).get("mode", "?")
    lines = [f"{job.job_id}  {state_name(job.state)}  {mode} · {len(job.servers)} servers · "
             f"{sum(1 for w in job.workers if w.alive)} workers" + (f"  — {job.reason}" if job.reason else "")]
    fraction, label = stop_fraction(job, target)
    eta = ""
    if job.max_steps and job.steps_per_s > 0 and job.state not in FINAL_STATES:
        eta = f"  eta {max(0.0, (job.max_steps - job.step) / job.steps_per_s):.0f}s"
    lines.append(f"[{progress_bar(fraction)}] {fraction * 100:5.1f}%  {label}  "
                 f"{job.steps_per_s:.1f} steps/s{eta}")
    losses = [p.loss for p in job.losses]
    if losses:
        lines.append(f"loss      {job.loss:<8.4f} {progress.sparkline(losses, 40)}  "
                     f"{losses[0]:.3f} -> {losses[-1]:.3f}")
    if job.has_eval:
        values = [e.value for e in job.evals if e.metric == job.metric]
        lines.append(f"{job.metric[:9]:<9} {job.metric_value:<8.4f} {progress.sparkline(values, 40)}  "
                     f"best {job.best_metric:.4f} @{job.best_step}" + (f", target {target:g}" if target else ""))
    live = [w for w in job.workers if w.alive]
    if live:
        lead = max(w.step for w in live)
        slowest = min(live, key=lambda w: (w.step, w.steps_per_s)) if len(live) > 1 else None
        # Workers report every ~0.5 s, so a lag under a second's worth of steps is just timing.
        noise = max(1.0, job.steps_per_s * REPORT_NOISE_S)
        for i, w in enumerate(sorted(live, key=lambda w: w.rank)):
            mark = ""
            if slowest is not None and w.node_id == slowest.node_id and lead - w.step > noise:
                mark = f"  <- straggler ({lead - w.step} behind)"
            lines.append(f"{'workers' if i == 0 else '':<9} {w.node_id:<16} rank {w.rank:<3} step {w.step:<7} "
                         f"{w.steps_per_s:6.1f} steps/s  loss {w.loss:.4f}{mark}")
    for i, load in enumerate(loads):
        detail = load.error or (f"shards {','.join(map(str, load.shards))}  version "
                                f"{max(load.versions, default=0)}  {load.rate:6.1f} pushes/s")
        lines.append(f"{'servers' if i == 0 else '':<9} {load.server_id:<16} {load.address:<21} {detail}")
    return [line[:width] for line in lines]


class ServerProbe:
    """Samples GetShardInfo on a job's servers to compute their push rates. Not thread-safe."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self._last: dict[str, tuple[float, int]] = {}

    def loads(self, job: coordinator_pb2.JobInfo) -> list[ServerLoad]:
        by_server: dict[str, ServerLoad] = {}
        for shard in job.shard_map.shards:
            by_server.setdefault(shard.server_id, ServerLoad(shard.server_id, shard.address))
        for load in by_server.values():
            self._sample(job.job_id, load)
        return list(by_server.values())

    def _sample(self, job_id: str, load: ServerLoad) -> None:
        if load.address not in self._channels:
            self._channels[load.address] = rpc.make_channel(load.address)
        stub = ps_pb2_grpc.ParameterServerStub(self._channels[load.address])
        try:
            reply = stub.GetShardInfo(ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=2.0)
        except grpc.RpcError as exc:
            load.error = f"unreachable ({exc.code().name.lower()})"
            return
        load.shards = [s.shard_index for s in reply.shards]
        load.versions = [s.version for s in reply.shards]
        load.pushes = sum(s.pushes_applied for s in reply.shards)
        now = time.monotonic()
        if load.server_id in self._last:
            t0, p0 = self._last[load.server_id]
            load.rate = (load.pushes - p0) / (now - t0) if now > t0 else 0.0
        self._last[load.server_id] = (now, load.pushes)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def watch_screen(client: CoordinatorClient, job_id: str, interval_s: float, timeout_s: float | None,
                 stream=sys.stdout) -> coordinator_pb2.JobInfo:
    """Redraws the view in place every interval until the job ends; returns its final info.

    Raises TimeoutError after timeout_s (None: until the job ends).
    """
    probe = ServerProbe()
    drawn = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            job = client.job(job_id, history=True)
            lines = render(job, probe.loads(job), shutil.get_terminal_size().columns)
            if drawn:
                stream.write(f"\033[{drawn}F")  # back to the first line of the last frame
            stream.write("".join(f"\033[K{line}\n" for line in lines) + "\033[J")
            stream.flush()
            drawn = len(lines)
            if job.state in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state_name(job.state)} after {timeout_s:g}s")
            time.sleep(interval_s)
    finally:
        probe.close()
