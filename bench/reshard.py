"""reshard: a sync job's step rate while `shardps reshard` moves its shards, from 2 servers to
4 and back, against its rate just before each move (issue 14: "the job's step rate during the
move stays above half its rate before").

Real daemons: a coordinator, 4 servers and 2 workers (`--step-delay-ms 30`, so that the step
rate is the job's own, as in tests/e2e/test_reshard.py). Each repetition is a new job of 4
shards on 2 of the servers; its step is shard 0's version on its primary (no move takes shard
0). `before`: steps per second over the 2 s before the Reshard call; `during`: from the call
to the reshard's DONE. Reports every move and the median of during / before.

  python -m bench.reshard              # 3 jobs, 2 moves each      (~2 min)
  python -m bench.reshard --small      # 1 job
"""

from __future__ import annotations

import time

from bench import procs, report
from shardps.client.api import CoordinatorClient
from shardps.proto import coordinator_pb2, ps_pb2, ps_pb2_grpc
from shardps.runtime import rpc

SPEC = """
name: bench-reshard
seed: 5
model: {name: mlp, kwargs: {hidden: [32]}}
data: {dataset: digits, batch_size: 64, shuffle: true}
optimizer: {lr: 0.002}
consistency: {mode: sync}
cluster: {servers: 2, workers: 2, shards: 4}
stop: {max_steps: 100000, eval_every: 100000}
checkpoint: {every_steps: 0}
"""


def step_of(address: str, job_id: str) -> tuple[float, int]:
    """(now, shard 0's version on the server at `address`)."""
    with rpc.make_channel(address) as channel:
        reply = ps_pb2_grpc.ParameterServerStub(channel).GetShardInfo(
            ps_pb2.GetShardInfoRequest(job_id=job_id), timeout=rpc.CONTROL_DEADLINE_S)
    return time.monotonic(), next(s.version for s in reply.shards if s.shard_index == 0)


def moves(client: CoordinatorClient, job_id: str) -> list[tuple[int, float, float, float]]:
    """Reshards the running job to 4 servers and back to 2; (servers, steps/s before, steps/s
    during, seconds the move took) for each."""
    address = client.job(job_id).shard_map.shards[0].address
    rows = []
    for servers in (4, 2):
        t0, v0 = step_of(address, job_id)
        time.sleep(2.0)
        t1, v1 = step_of(address, job_id)
        client.reshard(job_id, servers)
        done = procs.wait_until(
            lambda: client.job(job_id).reshard.state == coordinator_pb2.RESHARD_STATE_DONE,
            60, interval=0.05)
        t2, v2 = step_of(address, job_id)
        if not done:
            raise RuntimeError(f"the reshard to {servers} servers was not done within 60 s")
        rows.append((servers, (v1 - v0) / (t1 - t0), (v2 - v1) / (t2 - t1), t2 - t1))
    return rows


def main() -> None:
    parser = report.parser(__doc__, "1 job")
    parser.add_argument("--jobs", type=int, default=3, help="jobs, one after the other")
    args = parser.parse_args()
    if args.small:
        args.jobs = 1
    coord = procs.Child("shardps-coordinator", ["--port", "0", "--metrics-port", "-1",
                                                "--log-level", "WARNING"])
    daemons = procs.start_servers(4, extra=["--coordinator", coord.address])
    workers = [procs.Child("shardps-worker", [
        "--coordinator", coord.address, "--port", "0", "--metrics-port", "-1", "--device", "cpu",
        "--step-delay-ms", "30", "--log-level", "WARNING"]) for _ in range(2)]
    client = CoordinatorClient(coord.address)
    table = report.Table("reshard: a sync job's steps/s during each move vs just before",
                         ["job", "to_servers", "before", "during", "ratio", "move_s"])
    ratios = []
    try:
        procs.wait_until(lambda: len(client.nodes()) == 6, 60)
        for job in range(args.jobs):
            job_id = client.submit(SPEC)
            if not procs.wait_until(lambda j=job_id: client.job(j).step >= 30, 120):
                raise RuntimeError(f"job {job_id} did not reach step 30 within 120 s")
            for servers, before, during, took in moves(client, job_id):
                ratios.append(during / before)
                table.add(job=job, to_servers=servers, before=before, during=during,
                          ratio=during / before, move_s=took)
            client.cancel(job_id)
    finally:
        client.close()
        procs.stop_all([*workers, *daemons, coord])
    print(f"median during / before: {report.median(ratios):.3f} over {len(ratios)} moves")
    report.write("reshard", [table], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
