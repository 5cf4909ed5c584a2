"""A sync job with int8 pushes and pulls (error feedback on both ends) through a SIGKILLed
server: the restarted server restores a checkpoint, every shard rolls back, and the job
ends bitwise equal to a straight run: each worker takes back the residuals it had at the
checkpoint's version (kept at every checkpoint.every_steps), and each shard's checkpoint
keeps the mirror of the copy the workers held, which the workers' dense resets then carry
(docs/network.md, "Compressed pushes", "Compressed pulls"). With `cluster.replicas: 2` the
same SIGKILL rolls nothing back: the primary forwards each compressed push to its backup
decoded, as fp32."""

from __future__ import annotations

import pytest

from shardps.proto import common_pb2
from tests.e2e.test_recovery import Cluster, assert_same_state, checkpointed_state, spec

COMPRESSED = "transport: {compress: int8, compress_pull: int8}\n"


@pytest.mark.timeout(480)
def test_a_compressed_sync_job_rolls_back_after_a_sigkill_and_completes(tmp_path):
    """On one cluster: the job straight; with R = 1 as above, every shard bitwise the
    straight run's at the end; then R = 2, where the primary forwards each int8 push to its
    backup decoded (fp32): the backup of the victim's shard is promoted, nothing rolls back,
    no worker drops its residuals, and the job completes at its step budget."""
    steps, every = 120, 20
    cluster = Cluster(tmp_path, servers=2, workers=2, worker_args=[["--step-delay-ms", "15"], []])
    try:
        straight = cluster.client.submit(spec(steps=steps, every=every) + COMPRESSED)
        assert cluster.final(straight).state == common_pb2.JOB_STATE_COMPLETED
        reference = checkpointed_state(cluster, straight)
        assert all(s.mirror is not None and s.mirror.setting == "int8" for s in reference)
        for replicas in (1, 2):
            job_id = cluster.client.submit(spec(steps=steps, every=every, replicas=replicas)
                                           + COMPRESSED)
            final = killed_at_step_50(cluster, job_id)
            rolled = [w.has_line(rf"job {job_id}: rollback 1: a server restored version")
                      for w in cluster.workers]  # each took the rollback, dropping residuals
            if replicas == 1:
                assert final.rollback_id == 1 and final.rollback_version % every == 0
                assert all(rolled), [w.output() for w in cluster.workers]
                for a, b in zip(reference, checkpointed_state(cluster, job_id), strict=True):
                    assert_same_state(a, b)
            else:
                assert final.rollback_id == 0 and not any(rolled)
                assert cluster.coord.has_line(rf"job {job_id} shard 1: primary server-\w+ "
                                              r"lost; backup server-\w+ promoted"), \
                    cluster.coord.output()
            assert [s.version for s in checkpointed_state(cluster, job_id)] == [steps, steps]
    finally:
        cluster.stop()


def killed_at_step_50(cluster: Cluster, job_id: str):
    """SIGKILLs the server of the job's shard 1 at step 50 and restarts it; the job's end,
    which must be COMPLETED."""
    cluster.wait_step(job_id, 50)
    victim = cluster.server_of_shard(job_id, 1)
    cluster.servers[victim].kill()  # SIGKILL
    cluster.restart_server(victim)
    final = cluster.final(job_id)
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
    return final


MOMENTUM = ("optimizer: {lr: 0.002, freeze_variance_after: 10, precondition_pushes: true, "
            "worker_momentum: true}\ntransport: {compress: sign, compress_warmup_steps: 10, "
            "compress_pull: \"sign:32\"}\n")


@pytest.mark.timeout(300)
def test_sign_pushes_of_the_workers_momentum_roll_back_after_a_sigkill_and_complete(tmp_path):
    """The 1-3 Gbit/s setting (sign pushes of the workers' momentum, `sign:32` pull deltas)
    through a SIGKILLed server: the shard restores a checkpoint taken after the freeze, every
    worker takes back the momentum and residuals it had there, reads D again, and the job
    ends bitwise equal to a straight run, and learns (its last evaluation beats the first,
    at step 40)."""
    steps, every = 120, 20
    job_spec = spec(steps=steps, every=every, eval_every=40) + MOMENTUM
    cluster = Cluster(tmp_path, servers=2, workers=2, worker_args=[["--step-delay-ms", "15"], []])
    try:
        straight = cluster.client.submit(job_spec)
        assert cluster.final(straight).state == common_pb2.JOB_STATE_COMPLETED
        reference = checkpointed_state(cluster, straight)
        job_id = cluster.client.submit(job_spec)
        final = killed_at_step_50(cluster, job_id)
        assert final.rollback_id == 1 and final.rollback_version >= 20, final
        for w in cluster.workers:
            assert w.has_line(rf"job {job_id}: rollback 1: a server restored version"), w.output()
        for a, b in zip(reference, checkpointed_state(cluster, job_id), strict=True):
            assert a.version == steps
            assert_same_state(a, b)
        accuracy = [(e.step, e.value) for e in final.evals if e.metric == "accuracy"]
        print(f"rolled back to {final.rollback_version}; accuracy (step, value): {accuracy}")
        assert accuracy[0][0] == 40 and accuracy[-1][0] == steps, accuracy
        assert accuracy[-1][1] > accuracy[0][1], accuracy
    finally:
        cluster.stop()
