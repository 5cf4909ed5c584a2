"""A sync job with int8 pushes and pulls (error feedback on both ends) through a SIGKILLed
server: the restarted server restores a checkpoint, every shard rolls back, the workers drop
their residuals and replay, and the job completes at its step budget. Not bitwise equal to a
straight run, unlike an uncompressed job: the residuals are not checkpointed, so the replay
starts from none (docs/network.md)."""

from __future__ import annotations

import pytest

from shardps.proto import common_pb2
from tests.e2e.test_recovery import Cluster, checkpointed_state, spec

COMPRESSED = "transport: {compress: int8, compress_pull: int8}\n"


@pytest.mark.timeout(420)
def test_a_compressed_sync_job_rolls_back_after_a_sigkill_and_completes(tmp_path):
    steps, every = 120, 20
    cluster = Cluster(tmp_path, servers=2, workers=2, worker_args=[["--step-delay-ms", "15"], []])
    try:
        job_id = cluster.client.submit(spec(steps=steps, every=every) + COMPRESSED)
        cluster.wait_step(job_id, 50)
        victim = cluster.server_of_shard(job_id, 1)
        cluster.servers[victim].kill()  # SIGKILL
        cluster.restart_server(victim)
        final = cluster.final(job_id)
        assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
        assert final.rollback_id == 1 and final.rollback_version % every == 0
        for worker in cluster.workers:  # each took the rollback (and dropped its residuals)
            assert worker.has_line(rf"job {job_id}: rollback 1: a server restored version"), \
                worker.output()
        assert [s.version for s in checkpointed_state(cluster, job_id)] == [steps, steps]
    finally:
        cluster.stop()
