"""sparse: embedding tables on the servers (issue 12), ratios in one run.

(a) rows: one worker's step (pull the batch's rows, forward/backward, push their gradient)
    against 2 servers holding a fixed table of 1M and of 100M rows (dim 16, row-wise Adagrad),
    the same model and id stream (ids drawn from [0, 1M)): the cost follows the rows touched.
(b) rows/s: the batch's unique rows pulled and their gradient pushed and applied (lazy Adam) by
    1 worker and 2 servers, against one process gathering the same rows and applying
    torch.optim.SparseAdam to the same table and id stream; and the same over the gRPC
    fallback (RowClient without the data plane).
(d) DDP: the same model with a dense embedding gradient all-reduced over gloo (2 processes,
    Adam) against the shardps step of (a) (lazy Adam), over table sizes DDP can still hold.

The worker side is shardps's RowClient in this process (its requests to every shard sent before
any reply is read, over the servers' data planes); the servers are real `shardps-server`s
(async job: a push applies on arrival, so its reply waits for the update). The servers' rows
are seeded in 8 MiB InitRows calls, not timed (tables over --seed-up-to rows stay at the
servers' zeros: seeding 100M rows from one worker takes minutes here, and no timing depends
on the values). Steps: a warm-up, then medians.

  python -m bench.sparse                          # (a) 1M,100M  (b) 1M  (d) 10K,1M,10M
  python -m bench.sparse --parts a --big 10M      # one part, another size
  python -m bench.sparse --small
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from bench import procs, report
from shardps.proto import common_pb2, ps_pb2, ps_pb2_grpc
from shardps.proto.tables import FixedLayout
from shardps.psclient import PSClient
from shardps.psclient.rows import RowClient, RowPull, RowPush
from shardps.runtime import rpc

JOB, TABLE, DIM, HIDDEN = "bench-sparse", "emb", 16, 64
SEED_ROWS = 1 << 20  # rows generated and sent per seeding piece


class IdStream:
    """`steps` batches of `batch` bags of `bag` ids, uniform over [0, id_range), fixed by seed."""

    def __init__(self, steps: int, batch: int, bag: int, id_range: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, id_range, (batch, bag), generator=gen) for _ in range(steps)]
        self.labels = [torch.randint(0, 2, (batch,), generator=gen).float() for _ in range(steps)]


class Head(nn.Module):
    """The dense part: bag sums -> 64 -> 1 logit."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled).squeeze(1)


class Served:
    """A fixed table of `rows` rows on standalone servers, seeded with random rows, and this
    process's RowClient to it (the worker side of an async job); `close` drops the job."""

    jobs = itertools.count()

    def __init__(self, servers: list[procs.Child], rows: int, optimizer: str,
                 data_plane: bool = True, seed: bool = True):
        """`seed`: send random rows (else the rows stay at the servers' zeros: the timings
        do not depend on the values, and seeding 100M rows from here takes minutes)."""
        self.job_id = f"{JOB}-{next(Served.jobs)}"
        self.servers = servers
        smap = procs.shard_map([s.address for s in servers], 8 * len(servers))
        spec = ps_pb2.TableSpec(name=TABLE, dim=DIM, num_embeddings=rows, num_shards=len(servers),
                                optimizer=optimizer, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
        with PSClient(self.job_id, smap, data_plane=False) as ps:
            ps.init(torch.zeros(8 * len(servers)), ps_pb2.ShardConfig(
                optimizer=common_pb2.OptimizerConfig(name="adam", lr=0.01, beta1=0.9,
                                                     beta2=0.999, eps=1e-8),
                mode=common_pb2.CONSISTENCY_ASYNC, workers=["w0"], epoch=1,
                layout_fingerprint="bench", tables=[spec]))
        self.client = RowClient(self.job_id, smap, worker_id="w0", data_plane=data_plane)
        self.layout = FixedLayout(TABLE, rows, len(servers))
        self.step_count = 0
        for shard in range(len(servers) if seed else 0):
            held = self.layout.rows_on(shard)
            for lo in range(0, held, SEED_ROWS):
                piece = torch.randn(min(SEED_ROWS, held - lo), DIM)
                self.client.init_rows(TABLE, shard, piece, first_row=lo)

    def pull(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of strictly increasing `ids`, every shard asked at once."""
        server, _ = self.layout.place(ids)
        masks = [server == s for s in range(self.client.num_shards)]
        got = self.client.pull_many([RowPull(TABLE, s, ids[m]) for s, m in enumerate(masks)], DIM)
        out = torch.empty((ids.numel(), DIM))
        for mask, (reply, rows) in zip(masks, got, strict=True):
            assert reply.ready and rows is not None
            out[mask] = rows
        return out

    def push(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        server, _ = self.layout.place(ids)
        masks = [server == s for s in range(self.client.num_shards)]
        replies = self.client.push_many(
            [RowPush(TABLE, s, ids[m], grads[m]) for s, m in enumerate(masks)],
            step=self.step_count, batch_size=1)
        assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
        self.step_count += 1

    def pull_push(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """The rows of `ids` pulled, then `grads` pushed for them (applied on arrival)."""
        self.pull(ids)
        self.push(ids, grads)

    def close(self) -> None:
        self.client.close()
        for server in self.servers:
            with rpc.make_channel(server.address) as channel:
                ps_pb2_grpc.ParameterServerStub(channel).DropJob(
                    ps_pb2.DropJobRequest(job_id=self.job_id), timeout=rpc.CONTROL_DEADLINE_S)


def model_step(served: Served, head: Head, adam: torch.optim.Optimizer, bags: torch.Tensor,
               labels: torch.Tensor) -> dict[str, float]:
    """One worker step: pull the batch's rows, forward/backward, push their gradient."""
    t0 = time.perf_counter()
    ids, inverse = torch.unique(bags, return_inverse=True)
    rows = served.pull(ids).requires_grad_()
    t1 = time.perf_counter()
    pooled = F.embedding_bag(inverse.view(-1), rows,
                             torch.arange(0, inverse.numel(), bags.shape[1]), mode="sum")
    adam.zero_grad()
    F.binary_cross_entropy_with_logits(head(pooled), labels).backward()
    adam.step()
    assert rows.grad is not None
    t2 = time.perf_counter()
    served.push(ids, rows.grad)
    t3 = time.perf_counter()
    return {"pull": t1 - t0, "compute": t2 - t1, "push": t3 - t2, "step": t3 - t0}


def time_model(servers: list[procs.Child], rows: int, optimizer: str, stream: IdStream,
               seed_up_to: int) -> dict[str, float]:
    """Median phases of the model's steps against a `rows`-row table (first step: warm-up),
    seeded if it has at most `seed_up_to` rows."""
    served = Served(servers, rows, optimizer, seed=rows <= seed_up_to)
    try:
        torch.manual_seed(0)
        head = Head()
        adam = torch.optim.Adam(head.parameters(), lr=0.01)
        phases: dict[str, list[float]] = {}
        for i, (bags, labels) in enumerate(zip(stream.batches, stream.labels, strict=True)):
            out = model_step(served, head, adam, bags, labels)
            for key, value in out.items():
                if i:
                    phases.setdefault(key, []).append(value)
    finally:
        served.close()
    return {k: report.median(v) for k, v in phases.items()}


def part_a(servers: list[procs.Child], small: int, big: int, stream: IdStream,
           seed_up_to: int) -> report.Table:
    table = report.Table(f"sparse (a): a worker step against 2 servers, table of N rows, dim {DIM}, "
                         "row-wise Adagrad, the same ids (ms, median)",
                         ["rows", "seeded", "unique_ids", "pull", "compute", "push", "step", "ratio"])
    unique = report.median([float(torch.unique(b).numel()) for b in stream.batches])
    base = 0.0
    for rows in (small, big):
        ms = {k: v * 1e3 for k, v in time_model(servers, rows, "adagrad", stream,
                                                 seed_up_to).items()}
        base = base or ms["step"]
        table.add(rows=report.human(rows), seeded=rows <= seed_up_to, unique_ids=int(unique),
                  ratio=ms["step"] / base, **ms)
        print(table.rows[-1], flush=True)
    return table


def part_b(servers: list[procs.Child], rows: int, stream: IdStream) -> report.Table:
    """Rows per second through the table: shardps (pull + push + lazy Adam on 2 servers), over
    the data plane and over the RPCs, against one process (gather + SparseAdam), the same
    unique ids and gradients; the three alternate step by step (the machine's load moves)."""
    id_sets = [torch.unique(b) for b in stream.batches]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(ids.numel(), DIM, generator=gen) for ids in id_sets]
    weight = nn.Parameter(torch.randn(rows, DIM))
    sparse_adam = torch.optim.SparseAdam([weight], lr=0.01)

    def local(ids: torch.Tensor, grad: torch.Tensor) -> None:
        weight.detach().index_select(0, ids)
        weight.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grad, weight.shape,
                                              check_invariants=False)
        sparse_adam.step()

    plane = Served(servers, rows, "lazy_adam", data_plane=True)
    fallback = Served(servers, rows, "lazy_adam", data_plane=False)
    rates: dict[str, list[float]] = {"plane": [], "grpc": [], "local": []}
    try:
        for i, (ids, grad) in enumerate(zip(id_sets, grads, strict=True)):
            for key, fn in (("plane", plane.pull_push), ("grpc", fallback.pull_push),
                            ("local", local)):
                t0 = time.perf_counter()
                fn(ids, grad)
                if i:
                    rates[key].append(ids.numel() / (time.perf_counter() - t0))
    finally:
        plane.close()
        fallback.close()
    rate = {k: report.median(v) for k, v in rates.items()}
    table = report.Table(f"sparse (b): rows/s through the table, {report.human(rows)} rows, dim {DIM}, "
                         "lazy Adam (median)",
                         ["rows", "unique_ids", "shardps_rows_per_s", "sparseadam_rows_per_s", "ratio",
                          "grpc_rows_per_s", "plane_over_grpc"])
    table.add(rows=report.human(rows), unique_ids=int(report.median([float(i.numel()) for i in id_sets])),
              shardps_rows_per_s=rate["plane"], sparseadam_rows_per_s=rate["local"],
              ratio=rate["plane"] / rate["local"], grpc_rows_per_s=rate["grpc"],
              plane_over_grpc=rate["plane"] / rate["grpc"])
    print(table.rows[-1], flush=True)
    return table


# -- (d) DDP: run as `python -m bench.sparse --ddp-rank R ...`, 2 processes over gloo ----------


def ddp_child(args) -> None:
    """Rank `args.ddp_rank` of the DDP baseline: nn.EmbeddingBag (dense gradient) + the head,
    Adam over everything; rank 0 prints the median step time as JSON."""
    import torch.distributed as dist

    host, port = args.store.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=args.ddp_rank, world_size=2)
    rows = report.parse_count(args.ddp_rows)
    stream = IdStream(args.ddp_steps + 1, args.batch, args.bag, rows, seed=args.ddp_rank)
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.EmbeddingBag(rows, DIM, mode="sum"), "head": Head()})
    net = nn.parallel.DistributedDataParallel(model)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)

    def forward(bags: torch.Tensor) -> torch.Tensor:
        return model["head"](model["emb"](bags))

    net.forward = forward  # type: ignore[method-assign]  # DDP hooks stay on the module
    times = []
    for i, (bags, labels) in enumerate(zip(stream.batches, stream.labels, strict=True)):
        dist.barrier()
        t0 = time.perf_counter()
        adam.zero_grad()
        F.binary_cross_entropy_with_logits(net(bags), labels).backward()
        adam.step()
        if i:
            times.append(time.perf_counter() - t0)
    dist.barrier()
    if args.ddp_rank == 0:
        print(json.dumps({"step": report.median(times)}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # gloo's threads may abort the interpreter's teardown (bench/tta.py)


def time_ddp(rows: int, args) -> float:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False)
    children = [subprocess.Popen(
        [sys.executable, "-m", "bench.sparse", "--ddp-rank", str(r), "--ddp-rows", str(rows),
         "--store", f"127.0.0.1:{store.port}", "--ddp-steps", str(args.ddp_steps),
         "--batch", str(args.batch), "--bag", str(args.bag), "--threads", str(args.threads)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [c.communicate(timeout=600) for c in children]
    del store
    if any(c.returncode for c in children):
        raise RuntimeError("DDP run failed:\n" + "\n".join(o[1][-2000:] for o in outputs))
    return float(json.loads(outputs[0][0].strip().splitlines()[-1])["step"])


def part_d(servers: list[procs.Child], sizes: list[int], args) -> report.Table:
    table = report.Table(f"sparse (d): step time against DDP (2 processes, gloo, dense embedding "
                         f"gradient, Adam), dim {DIM}, batch {args.batch} x {args.bag} ids per "
                         "worker (ms, median)",
                         ["rows", "shardps_step", "ddp_step", "ddp_over_shardps"])
    for rows in sizes:
        stream = IdStream(args.steps + 1, args.batch, args.bag, rows)
        shardps = time_model(servers, rows, "lazy_adam", stream, args.seed_up_to)["step"] * 1e3
        ddp = time_ddp(rows, args) * 1e3
        table.add(rows=report.human(rows), shardps_step=shardps, ddp_step=ddp,
                  ddp_over_shardps=ddp / shardps)
        print(table.rows[-1], flush=True)
    return table


def main() -> None:
    parser = report.parser(__doc__, "(a) 10K vs 100K, (b) 100K, (d) 100K rows; 4 steps")
    parser.add_argument("--parts", default="a,b,d", help="which of a, b, d to run")
    parser.add_argument("--small-rows", default="1M", help="(a) the small table")
    parser.add_argument("--big", default="100M", help="(a) the big table")
    parser.add_argument("--b-rows", default="1M", help="(b) the table")
    parser.add_argument("--ddp-sizes", default="10K,1M,10M", help="(d) the tables")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after a warm-up)")
    parser.add_argument("--ddp-steps", type=int, default=5, help="(d) DDP's timed steps")
    parser.add_argument("--batch", type=int, default=2048, help="bags per step")
    parser.add_argument("--bag", type=int, default=8, help="ids per bag")
    parser.add_argument("--seed-up-to", default="10M",
                        help="seed tables of at most this many rows (bigger ones stay at zeros)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--ddp-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-rows", default="", help=argparse.SUPPRESS)
    parser.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.seed_up_to = report.parse_count(args.seed_up_to)
    if args.ddp_rank >= 0:
        ddp_child(args)
        return
    if args.small:
        args.small_rows, args.big, args.b_rows, args.ddp_sizes = "10K", "100K", "100K", "100K"
        args.steps, args.ddp_steps, args.batch = 4, 3, 256
    parts, tables = set(args.parts.split(",")), []
    small = report.parse_count(args.small_rows)
    servers = procs.start_servers(2, threads=args.threads)
    try:
        if "a" in parts:
            stream = IdStream(args.steps + 1, args.batch, args.bag, small)
            tables.append(part_a(servers, small, report.parse_count(args.big), stream,
                                 args.seed_up_to))
        if "b" in parts:
            rows = report.parse_count(args.b_rows)
            tables.append(part_b(servers, rows, IdStream(args.steps + 1, args.batch, args.bag, rows)))
        if "d" in parts:
            sizes = [report.parse_count(s) for s in args.ddp_sizes.split(",")]
            tables.append(part_d(servers, sizes, args))
    finally:
        procs.stop_all(servers)
    report.write("sparse", tables, vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
