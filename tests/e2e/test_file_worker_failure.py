"""A sync job over a file dataset whose worker is SIGKILLed mid-epoch, every daemon a real process.

Each worker logs every file it opens with the epoch it reads it for (`reading PATH (epoch E)`):
the survivors finish the epoch of the kill with their own files (no file opened by two of them),
the dead worker's unread files wait for the next epoch, and in the next epoch the two survivors
read every train file, each once (docs/data.md, "Assignment when workers join or leave").
"""

import collections

from shardps.client import ctrdata
from shardps.client.api import CoordinatorClient
from shardps.proto import common_pb2, coordinator_pb2
from shardps.worker.fileorder import assign_files
from tests import harness

LEASE_MS = 1000
SEED = 4
# 13 files of 400 rows, the last held out: 4800 train rows in global batches of 24, 200 steps an
# epoch; 3 workers read 4 files each (8 rows a step), 2 survivors 6 each.
FILES, ROWS, BATCH, EPOCH_STEPS = 13, 5200, 24, 200
STEPS = 3 * EPOCH_STEPS
KILL_AT = EPOCH_STEPS + 30  # inside epoch 1, leaving 170 steps (>= 5 s at 30 ms) for the news
STEP_DELAY_MS = 30
SPEC = """
name: files-kill-a-worker
seed: {seed}
model: {{name: dlrm, kwargs: {{buckets: 64, dim: 4, bottom: [8], top: [8]}}}}
data: {{dataset: files, batch_size: {batch}, shuffle: true, files: {{path: {path}}}}}
consistency: {{mode: sync}}
cluster: {{servers: 1, workers: 3}}
stop: {{max_steps: {steps}, eval_every: 1000}}
"""


def files_read(daemon):
    """{epoch: [paths]} the daemon's reader opened, in order, from its log."""
    read = collections.defaultdict(list)
    for m in daemon.matches(r"reading (\S+) \(epoch (\d+)\)"):
        read[int(m.group(2))].append(m.group(1))
    return read


def test_survivors_of_a_sigkill_mid_epoch_read_no_file_twice_and_the_next_epoch_reads_all(tmp_path):
    log = tmp_path / "log"
    ctrdata.write_ctr(log, rows=ROWS, files=FILES, seed=1)
    train = sorted(str(p) for p in log.glob("*.npy"))[:-1]
    coord = harness.start("shardps-coordinator", "--port", "0", "--lease-ms", str(LEASE_MS))
    server = harness.Daemon("shardps-server", "--port", "0", "--coordinator", coord.address)
    workers = [harness.Daemon("shardps-worker", "--port", "0", "--device", "cpu", "--threads", "1",
                              "--step-delay-ms", str(STEP_DELAY_MS), "--coordinator", coord.address)
               for _ in range(3)]
    for daemon in (server, *workers):
        daemon.wait_ready()
    with CoordinatorClient(coord.address) as client:
        harness.poll(lambda: sum(n.state == coordinator_pb2.NODE_STATE_ALIVE for n in client.nodes()) == 4,
                     30, what="4 nodes alive")
        job_id = client.submit(SPEC.format(seed=SEED, batch=BATCH, path=log, steps=STEPS))
        running = harness.poll(lambda: (j := client.job(job_id)).step >= KILL_AT and j, 180,
                               interval=0.05, what=f"step {KILL_AT}")
        address = {n.node_id: n.address for n in client.nodes()}
        old_rank = {address[w.node_id]: w.rank for w in running.workers}
        victim = next(d for d in workers if old_rank[d.address] == 1)
        victim.kill()  # SIGKILL: no goodbye, mid-epoch 1
        final = client.wait(job_id, timeout_s=180, interval_s=0.1)
    assert final.state == common_pb2.JOB_STATE_COMPLETED, final.reason
    survivors = [d for d in workers if d is not victim]
    for daemon in survivors:  # the news reached it inside epoch 1, so epoch 2 is read by two
        switch = [int(m.group(1)) for m in daemon.matches(r"rank \d of 2 from step (\d+)")]
        assert len(switch) == 1 and KILL_AT <= switch[0] < 2 * EPOCH_STEPS, daemon.output()

    read = {d.address: files_read(d) for d in workers}
    for epoch in range(3):
        by_survivors = [p for d in survivors for p in read[d.address][epoch]]
        assert len(by_survivors) == len(set(by_survivors)), (epoch, by_survivors)
    # Epoch 1: each survivor read within its own files of the 3-worker assignment, all of them;
    # the victim's files were not read by anyone else in that epoch.
    for daemon in survivors:
        mine = assign_files(train, range(3), 1, SEED)[old_rank[daemon.address]]
        assert sorted(read[daemon.address][1]) == sorted(mine), daemon.output()
    victims_files = set(assign_files(train, range(3), 1, SEED)[1])
    assert set(read[victim.address][1]) <= victims_files
    # Epoch 2: the survivors, ranks 0 and 1 of 2, read every train file, each once.
    assert sorted(p for d in survivors for p in read[d.address][2]) == sorted(train)
    print(f"SIGKILL at step ~{running.step}; the victim had opened {len(read[victim.address][1])} of its "
          f"{len(victims_files)} files of epoch 1")
    for daemon in (*survivors, server, coord):
        daemon.stop()
