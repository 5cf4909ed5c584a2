"""The Python client: submit and follow jobs, list nodes, export weights.

`CoordinatorClient` wraps the coordinator's RPCs with deadlines and turns gRPC failures into
`ClientError` with the server's message. It is what the `shardps` CLI is built on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from shardps.proto import coordinator_pb2, coordinator_pb2_grpc, ps_pb2, ps_pb2_grpc
from shardps.runtime import rpc

if TYPE_CHECKING:  # torch loads only for export, so that status, watch, ... start fast
    import torch
from shardps.proto import spec as spec_lib
from shardps.proto.states import FINAL_STATES, state_name

# An export of a sync job whose shards are not at one version pulls again for this long: the
# servers of a job that has just ended settle on their next heartbeat (lease / 4).
EXPORT_SETTLE_S = 10.0
# `resume` waits this long for a job that has not ended yet (see CoordinatorClient.resume).
RESUME_WAIT_S = 60.0


def mixed_versions(info: coordinator_pb2.JobInfo, versions: list[int]) -> str:
    """Why weights pulled at `versions` (in shard order) are not one sync model, "" if they
    are. async and ssp shards count their own updates: their versions may differ."""
    if spec_lib.parse_spec(info.spec_yaml)["consistency"]["mode"] != "sync":
        return ""
    final = info.final_version if info.state in FINAL_STATES else -1
    if info.state in FINAL_STATES and final < 0:
        want = "its final version is not named yet (not every server has reported where it froze)"
    elif len(set(versions)) <= 1 and (final < 0 or versions[0] == final):
        return ""
    else:
        want = f"the job's final version is {final}" if final >= 0 else "the job is running"
    shards = ", ".join(f"shard {s.index} on {s.server_id} at version {v}"
                       for s, v in zip(info.shard_map.shards, versions, strict=True))
    return f"{want}; {shards}"


class ClientError(RuntimeError):
    """An RPC failed (the message is the server's, e.g. the spec key at fault), or the
    caller's input was unusable (`usage=True`)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, usage: bool = False):
        super().__init__(message)
        self.code = code
        self.usage = usage

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def read_spec(path: str) -> str:
    """Reads a spec file (`-`: stdin) and validates it locally, so mistakes are reported
    before any RPC; raises ClientError (usage) if it cannot be read or is invalid."""
    try:
        text = Path(path).read_text() if path != "-" else sys.stdin.read()
    except OSError as exc:
        raise ClientError(f"cannot read spec {path}: {exc.strerror}", usage=True) from None
    try:
        spec_lib.parse_spec(text)
    except spec_lib.SpecError as exc:
        raise ClientError(f"invalid spec {path}: {exc}", usage=True) from None
    return text


class CoordinatorClient:
    """Talks to one coordinator. Thread-safe (gRPC stubs are)."""

    def __init__(self, address: str, deadline_s: float = rpc.CONTROL_DEADLINE_S):
        self.address = address
        self.deadline_s = deadline_s
        self._channel = rpc.make_channel(address)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request, hold_s: float = 0.0):
        try:
            return getattr(self._stub, method)(request, timeout=hold_s + self.deadline_s)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ClientError(f"coordinator {self.address} is not reachable "
                                  f"({code.name.lower()})", code) from None
            raise ClientError(exc.details() or code.name, code) from None

    def submit(self, spec_yaml: str, resume_from: str = "") -> str:
        """Submits a job spec (YAML text); returns the job id. Bad specs raise ClientError.

        `resume_from` continues that ended job from its servers' last checkpoint.
        """
        return self._call("SubmitJob", coordinator_pb2.SubmitJobRequest(
            spec_yaml=spec_yaml, resume_from=resume_from)).job_id

    def resume(self, job_id: str, wait_s: float = RESUME_WAIT_S) -> str:
        """Submits the spec of ended job `job_id` again, continuing from its checkpoints;
        returns the new job's id.

        A job that has not ended yet is waited for, up to `wait_s`: after a full cluster stop
        and restart, a job whose workers are gone ends (FAILED, all workers lost) once their
        leases run out, a lease plus the restart grace after the coordinator's restart.
        Raises ClientError if it is still running then.
        """
        info = self.job(job_id)
        if info.state not in FINAL_STATES:
            try:
                info = self.wait(job_id, timeout_s=wait_s)
            except TimeoutError:
                raise ClientError(f"job {job_id} is still {state_name(self.job(job_id).state)} "
                                  f"after {wait_s:g} s: its workers are alive; cancel it to "
                                  "resume it now", grpc.StatusCode.FAILED_PRECONDITION) from None
        return self.submit(info.spec_yaml, resume_from=job_id)

    def checkpoint(self, job_id: str, timeout_s: float = 60.0) -> list[ps_pb2.ShardCheckpoint]:
        """Makes every server of a job write a checkpoint now; returns them in shard order.

        A running sync job is checkpointed at one version on every shard (the next round to
        close, within timeout_s), so the set can be resumed; other jobs at their current
        versions. Raises ClientError if the job has no shards or a server refuses.
        """
        info = self.job(job_id)
        if not info.shard_map.shards:
            raise ClientError(f"job {job_id} has no weights yet (state {state_name(info.state)})")
        addresses = list(dict.fromkeys(s.address for s in info.shard_map.shards))
        channels = [rpc.make_channel(address) for address in addresses]
        servers = [ps_pb2_grpc.ParameterServerStub(channel) for channel in channels]
        try:
            at_version = 0
            sync = spec_lib.parse_spec(info.spec_yaml)["consistency"]["mode"] == "sync"
            if sync and info.state not in FINAL_STATES:
                request = ps_pb2.GetShardInfoRequest(job_id=job_id)
                versions = [shard.version for server in servers
                            for shard in server.GetShardInfo(request, timeout=self.deadline_s).shards]
                at_version = max(versions, default=0) + 1
            checkpoint = ps_pb2.CheckpointRequest(job_id=job_id, at_version=at_version,
                                                  timeout_ms=int(timeout_s * 1000))
            # At once on every server: one after the other, a server asked late may already
            # be past at_version (and write a later one) by the time it is asked.
            calls = [server.Checkpoint.future(checkpoint, timeout=timeout_s + self.deadline_s)
                     for server in servers]
            # A replicated job's server also holds backups: each shard from its primary only.
            primary = {s.index: s.address for s in info.shard_map.shards}
            done = [shard for address, call in zip(addresses, calls, strict=True)
                    for shard in call.result().shards if primary.get(shard.shard_index) == address]
        except grpc.RpcError as exc:
            raise ClientError(f"checkpoint of {job_id} failed: {exc.details() or exc.code().name}",
                              exc.code()) from None
        finally:
            for channel in channels:
                channel.close()
        return sorted(done, key=lambda c: c.shard_index)

    def job(self, job_id: str, history: bool = False) -> coordinator_pb2.JobInfo:
        reply = self._call("GetJob", coordinator_pb2.GetJobRequest(job_id=job_id, include_history=history))
        return reply.job

    def jobs(self) -> list[coordinator_pb2.JobInfo]:
        return list(self._call("ListJobs", coordinator_pb2.ListJobsRequest()).jobs)

    def cancel(self, job_id: str) -> int:
        """Cancels a job; returns its state afterwards (a final job keeps its state)."""
        return self._call("CancelJob", coordinator_pb2.CancelJobRequest(job_id=job_id)).state

    def reshard(self, job_id: str, servers: int) -> coordinator_pb2.ReshardProgress:
        """Starts spreading a running job's shards over `servers` servers; returns the plan
        (its moves run while the job trains; `job(job_id).reshard` shows how far they got).
        Raises ClientError for a refusal (nothing changes)."""
        return self._call("Reshard", coordinator_pb2.ReshardRequest(
            job_id=job_id, servers=servers)).reshard

    def nodes(self) -> list[coordinator_pb2.NodeInfo]:
        return list(self._call("ListNodes", coordinator_pb2.ListNodesRequest()).nodes)

    def wait(self, job_id: str, timeout_s: float | None = None, interval_s: float = 0.5,
             on_update: Callable[[coordinator_pb2.JobInfo], None] | None = None
             ) -> coordinator_pb2.JobInfo:
        """Follows the job until it is final and returns it: an update every interval_s, and
        one as soon as its state changes (GetJob long-polls while the state is the last one
        seen; a coordinator holding too many calls answers at once and is asked again after
        interval_s).

        Raises TimeoutError after timeout_s (None: no limit, but every poll has a deadline and
        a coordinator that stays unreachable raises ClientError).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        info = None
        while True:
            asked = time.monotonic()
            last = info.state if info is not None else None
            if not last:
                info = self.job(job_id)
            else:
                info = self._call("GetJob", coordinator_pb2.GetJobRequest(
                    job_id=job_id, wait_ms=int(interval_s * 1000), wait_while_state=last),
                    hold_s=interval_s).job
            if on_update:
                on_update(info)
            if info.state in FINAL_STATES:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state_name(info.state)} after {timeout_s:g}s")
            if info.state == last:  # not held (the coordinator holds only so many): pace it
                time.sleep(max(0.0, interval_s - (time.monotonic() - asked)))

    def export(self, job_id: str, settle_s: float = EXPORT_SETTLE_S
               ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Pulls a job's fp32 weights from its servers as a state_dict.

        A sync job's shards must all be at one version: an ended job's final version
        (`JobInfo.final_version`), a running job's current one. Shards that are not (a job
        that has just ended, whose servers settle on their next heartbeat, or a running job
        between two rounds) are pulled again for up to `settle_s`. Returns (state_dict,
        per-shard versions). Raises ClientError if the job has no weights yet, a server does
        not answer, or the shards stay at different versions (a mixed model).
        """
        import torch

        from shardps.proto import layout

        deadline = time.monotonic() + settle_s
        while True:
            info = self.job(job_id)
            if not info.layout.total or not info.shard_map.shards:
                raise ClientError(f"job {job_id} has no weights yet (state {state_name(info.state)})")
            flat = torch.empty(info.layout.total, dtype=torch.float32)
            versions = self._pull_weights(job_id, info, flat)
            problem = mixed_versions(info, versions)
            if not problem:
                tables = self._pull_tables(job_id, info, versions)
                if tables is not None:  # "<module>.weight" as in the model; dynamic: .ids/.rows
                    return {**layout.unflatten(flat, info.layout), **tables}, versions
                problem = "a shard moved on while its tables were read"
            if time.monotonic() > deadline:
                raise ClientError(f"job {job_id}: {problem}; refusing to export a mixed model")
            time.sleep(0.25)

    def _pull_weights(self, job_id: str, info: coordinator_pb2.JobInfo,
                      flat: torch.Tensor) -> list[int]:
        from shardps.psclient import client as psclient

        try:
            with psclient.PSClient(job_id, info.shard_map) as ps:
                result = ps.pull(flat, min_version=0, timeout_s=rpc.CONTROL_DEADLINE_S)
        except grpc.RpcError as exc:
            raise ClientError(f"pulling weights of {job_id} failed: {exc.details() or exc.code().name}",
                              exc.code()) from None
        if not result.ready:
            raise ClientError(f"servers of {job_id} did not serve its weights in time")
        return list(result.versions)

    def _pull_tables(self, job_id: str, info: coordinator_pb2.JobInfo,
                     versions: list[int]) -> dict[str, torch.Tensor] | None:
        """The job's embedding tables (docs/tables.md): a fixed one as `<name>.weight`, a
        dynamic one as `<name>.ids` (int64, ascending) and `<name>.rows` (fp32 [len(ids), dim]),
        each shard read at its version in `versions`; None if one has moved on since."""
        from shardps.psclient import rows as psrows

        at = {s.index: v for s, v in zip(info.shard_map.shards, versions, strict=True)}
        first = info.shard_map.shards[0]
        try:
            with rpc.make_channel(first.address) as channel:
                shards = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
                    ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=rpc.CONTROL_DEADLINE_S).shards
            specs = [t for s in shards if s.shard_index == first.index for t in s.tables]
            if not specs:
                return {}
            client = psrows.RowClient(job_id, info.shard_map)
            try:
                out = {}
                for spec in specs:
                    versions = [at[i] for i in range(len(at))]
                    if not spec.num_embeddings:  # dynamic: "<name>.ids" / "<name>.rows"
                        pair = psrows.read_dynamic(client, spec, versions)
                        if pair is None:
                            return None
                        out[f"{spec.name}.ids"], out[f"{spec.name}.rows"] = pair
                        continue
                    table = psrows.read_table(client, spec, versions)
                    if table is None:
                        return None
                    out[f"{spec.name}.weight"] = table
                return out
            finally:
                client.close()
        except grpc.RpcError as exc:
            raise ClientError(f"reading the tables of {job_id} failed: "
                              f"{exc.details() or exc.code().name}", exc.code()) from None

    def export_to(self, job_id: str, path: Path) -> tuple[int, int, list[int]]:
        """Writes the job's weights to `path` as a state_dict (atomically: temp file, rename).

        Returns (tensors, parameters, per-shard versions).
        """
        import torch

        state_dict, versions = self.export(job_id)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state_dict, tmp)
        tmp.replace(path)
        return len(state_dict), sum(t.numel() for t in state_dict.values()), versions
