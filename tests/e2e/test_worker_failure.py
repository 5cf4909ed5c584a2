"""A sync job whose worker is killed with SIGKILL mid-run, every daemon a real process.

The coordinator's lease expires the dead worker, the servers complete the open round with the
workers that are left (and say so in their log and metrics), the survivors re-rank and take
over the dead worker's part of each global batch, and the job finishes. With
`cluster.replicas: 2` the same holds on every copy: each server is primary of one shard and
backup of the other, and the backups close the short rounds the primaries close.
"""

import signal
import time

import pytest

from shardps.client.api import CoordinatorClient
from shardps.client.scrape import scrape, total
from shardps.proto import common_pb2, coordinator_pb2
from tests import harness

LEASE_MS = 1000
STEPS = 150
BATCH = 64
STEP_DELAY_MS = 20  # every step takes at least this long, so the job is still running at the kill
# From the kill to the verdict: the lease (1 s), a server heartbeat (0.25 s) and the remaining
# steps (~0.1 s each at most on a loaded 2-core machine) fit many times over.
FINISH_WITHIN_S = 60.0


def spec(replicas: int) -> str:
    return f"""
name: kill-a-worker
model: {{name: mlp, kwargs: {{hidden: [32]}}}}
data: {{dataset: digits, batch_size: {BATCH}, shuffle: false}}
consistency: {{mode: sync}}
cluster: {{servers: 2, workers: 3, replicas: {replicas}}}
stop: {{max_steps: {STEPS}, eval_every: 50}}
"""



@pytest.mark.parametrize("replicas", [1, 2])
def test_sync_job_finishes_with_the_others_after_a_worker_is_killed(replicas):
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", str(LEASE_MS))
    servers = [harness.Daemon("shardps-server", "--port", "0", "--metrics-port", "0",
                              "--coordinator", coord.address) for _ in range(2)]
    workers = [harness.Daemon("shardps-worker", "--port", "0", "--metrics-port", "0",
                              "--device", "cpu", "--threads", "1",
                              "--step-delay-ms", str(STEP_DELAY_MS),
                              "--coordinator", coord.address) for _ in range(3)]
    for daemon in (*servers, *workers):  # started together, ready in any order
        daemon.wait_ready()
    started = time.monotonic()
    with CoordinatorClient(coord.address) as client:
        harness.poll(lambda: sum(n.state == coordinator_pb2.NODE_STATE_ALIVE
                                 for n in client.nodes()) == 5, 30, what="5 nodes alive")
        job_id = client.submit(spec(replicas))
        running = harness.poll(lambda: (j := client.job(job_id)).step >= 20 and j, 120,
                               interval=0.05, what="step 20")
        assert running.state == common_pb2.JOB_STATE_RUNNING
        address = {n.node_id: n.address for n in client.nodes()}
        by_rank = {w.rank: w.node_id for w in running.workers}
        victim = next(d for d in workers if d.address == address[by_rank[1]])
        victim.kill()  # SIGKILL: no goodbye heartbeat, no last push
        killed = time.monotonic()
        final = client.wait(job_id, timeout_s=FINISH_WITHIN_S, interval_s=0.05)
        elapsed = time.monotonic() - killed
    print(f"SIGKILL of rank 1 at step ~{running.step}: job {final.reason} "
          f"{elapsed:.1f} s later")
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
    assert elapsed < FINISH_WITHIN_S
    assert final.epoch == 2  # one membership change
    ranks = {w.node_id: (w.rank, w.alive) for w in final.workers}
    assert ranks == {by_rank[0]: (0, True), by_rank[1]: (-1, False), by_rank[2]: (1, True)}

    _check_servers_completed_short_rounds(servers, job_id, copies=replicas)
    _check_survivors_took_half_batches(workers, victim, address, by_rank, running.step, job_id)
    print(f"daemons ready to job end {time.monotonic() - started:.1f} s")
    _stop_survivors((*workers, *servers, coord), victim)


def _check_servers_completed_short_rounds(servers, job_id, copies):
    """Every server dropped the dead worker; those holding a round it never pushed completed
    that round with the two left and said so in their log and metrics. (A worker killed
    mid-push may have reached some shards: their round was complete.)"""
    short_rounds = 0
    for server in servers:
        assert server.has_line(r"workers worker-\w+,worker-\w+ \(epoch 2\)"), server.output()
        text = scrape(server.metrics_address)
        short = total(text, "shardps_ps_short_rounds_total", job=job_id)
        said = server.has_line(r"round \d+ completed with 2 of the 3 workers it opened with")
        assert said == (short >= 1), server.output()
        short_rounds += short
        assert total(text, "shardps_ps_live_workers", job=job_id) == 2 * copies
        # Every copy at the last step once it has frozen (a backup closes the last round
        # when the primary forwards it the last push, a moment after the first reports).
        harness.poll(lambda s=server: total(scrape(s.metrics_address), "shardps_ps_version",
                                            job=job_id) == STEPS * copies, 30,
                     what=f"every copy on {server.address} at version {STEPS}")
    assert short_rounds >= 1


def _check_survivors_took_half_batches(workers, victim, address, by_rank, killed_at_step,
                                       job_id):
    """The survivors re-ranked (0 and 1 of 2) and from then on each took half of every global
    batch: their sample counts are exactly old slice x steps before + 32 x steps after."""
    old_slice = {by_rank[0]: 22, by_rank[2]: 21}  # 64 samples over 3 ranks
    for daemon in workers:
        if daemon is victim:
            continue
        node = next(n for n, a in address.items() if a == daemon.address)
        new_rank = 0 if node == by_rank[0] else 1
        switches = [int(m.group(1))
                    for m in daemon.matches(rf"rank {new_rank} of 2 from step (\d+)")]
        assert len(switches) == 1, daemon.output()
        switch = switches[0]
        assert killed_at_step <= switch < STEPS
        samples = daemon.metric("shardps_worker_samples_total", job=job_id)
        assert samples == old_slice[node] * switch + (BATCH // 2) * (STEPS - switch)


def _stop_survivors(daemons, victim):
    """SIGTERM to every daemon but the killed one; each exits 0."""
    stopping = time.monotonic()
    for daemon in daemons:
        if daemon is not victim:
            daemon.signal(signal.SIGTERM)
    for daemon in daemons:
        if daemon is not victim:
            assert daemon.wait(30) == 0, daemon.output()
    print(f"stopping took {time.monotonic() - stopping:.1f} s")
