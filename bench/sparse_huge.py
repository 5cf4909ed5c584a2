"""sparse (c): a model whose embedding tables total a billion parameters trains on 4 servers on
this machine, and each server's resident memory follows the rows it holds.

The tables are server-initialised (`EmbeddingBag(N, dim, init=RowInit(...))`, docs/tables.md
"Tables too big for a worker"): the worker (this process: the trainer's TableSync, FlatParams,
PSClient and RowClient, as `shardps-worker` runs them) never builds them; each of the
`--servers` real `shardps-server`s fills its rows from init_rows at InitShard, in blocks. A
sync job with one worker then trains `--steps` steps: each step pulls the dense head, fetches
the batch's rows by id, pushes their row gradients and the dense gradient. Row-wise Adagrad by
default (one float of state per row: a billion parameters at dim 16 take 4.25 GB of servers);
lazy Adam would take 12 bytes per parameter.

Each server's VmRSS and VmHWM (peak) are read from /proc after the last step and compared with
1.3 x its rows' bytes (weights + optimizer state) + 300 MB (the acceptance bound; an idle
server is about 250 MB: interpreter, torch, gRPC). Also: the worker's own peak, InitShard's
time (the servers filling their rows, in parallel), and the median step time.

  python -m bench.sparse_huge                 # 62.5M rows x dim 16 = 1.0G parameters, 4 servers
  python -m bench.sparse_huge --tables 2 --rows 31.25M
  python -m bench.sparse_huge --small         # 200K rows, 2 steps (what CI runs)
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench import procs, report
from shardps.proto import common_pb2, ps_pb2
from shardps.proto import spec as spec_lib
from shardps.proto.tables import FixedLayout, RowInit
from shardps.psclient import PSClient
from shardps.psclient.rows import RowClient
from shardps.worker.embedding import EmbeddingBag
from shardps.worker.flat import FlatParams
from shardps.worker.tablesync import TableSync

JOB = "bench-sparse-huge"
SEED = 11
MB = 1e6
STATE_BYTES = {"adagrad": lambda dim: 4, "lazy_adam": lambda dim: 8 * dim}  # per row


def _self_peak() -> int:
    """This process's peak resident bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class HugeModel(nn.Module):
    """`tables` server-initialised EmbeddingBags (sum of `bag` ids per sample) and a linear
    head: a click-through-style binary model."""

    def __init__(self, tables: int, rows: int, dim: int):
        super().__init__()
        init = RowInit("uniform", -0.05, 0.05)
        self.tables = nn.ModuleList(EmbeddingBag(rows, dim, mode="sum", init=init)
                                    for _ in range(tables))
        self.head = nn.Linear(tables * dim, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [tables, batch, bag]
        pooled = [table(ids[t]) for t, table in enumerate(self.tables)]
        return self.head(torch.cat(pooled, 1)).squeeze(1)


class Direct:
    """TableSync's Caller: each row call made once (a bench has nothing to retry)."""

    def call(self, what, fn):
        return fn()


def job_spec(optimizer: str, lr: float) -> spec_lib.JobSpec:
    return spec_lib.validate({"seed": SEED, "model": {"name": "mlp"}, "stop": {"max_steps": 1},
                              "data": {"dataset": "digits"},
                              "optimizer": {"lr": lr}, "tables": {"optimizer": optimizer}})


def batch_of(step: int, tables: int, rows: int, batch: int, bag: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids drawn uniformly from each table (every step touches new rows), and labels that
    depend on the parity of the first id, so that the loss can fall."""
    gen = torch.Generator().manual_seed(SEED * 1000 + step % 4)  # 4 batches, seen again
    ids = torch.randint(0, rows, (tables, batch, bag), generator=gen)
    return ids, (ids[0, :, 0] % 2).float()


def run(args) -> dict:
    torch.manual_seed(SEED)
    model = HugeModel(args.tables, args.rows, args.dim)  # builds no table
    built_mb = _self_peak() / MB
    tables = TableSync(model, job_spec(args.optimizer, args.lr))
    flat = FlatParams(model)  # the dense head only
    children = procs.start_servers(args.servers, threads=1)
    losses, step_s = [], []
    try:
        smap = procs.shard_map([c.address for c in children], flat.numel)
        ps = PSClient(JOB, smap, worker_id="w0")
        rows_client = RowClient(JOB, smap, worker_id="w0")
        tables.bind(rows_client, Direct())
        start = time.perf_counter()
        ps.init(flat.flat, ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=args.lr, beta1=0.9,
                                                 beta2=0.999, eps=1e-8),
            mode=common_pb2.CONSISTENCY_SYNC, workers=["w0"], epoch=1,
            layout_fingerprint="bench", tables=tables.specs(args.servers)))
        init_s = time.perf_counter() - start
        print(f"  InitShard (servers fill their rows): {init_s:.1f} s", flush=True)
        for step in range(args.steps):
            start = time.perf_counter()
            result = ps.pull(flat.host_weights, min_version=step, timeout_s=300)
            assert result.ready, result
            flat.upload()
            flat.zero_grad()
            ids, y = batch_of(step, args.tables, args.rows, args.batch, args.bag)
            loss = nn.functional.binary_cross_entropy_with_logits(model(ids), y)
            loss.backward()
            for reply in tables.push(step, args.batch):
                assert reply.status == ps_pb2.PUSH_STATUS_ACCEPTED, reply
            replies = ps.push(flat.host_grad(), step=step, base_version=step, batch_size=args.batch)
            assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
            step_s.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            print(f"  step {step}: loss {losses[-1]:.4f} ({step_s[-1]:.2f} s)", flush=True)
        ps.close()
        rows_client.close()
        servers = [server_row(i, child, args) for i, child in enumerate(children)]
    finally:
        procs.stop_all(children)
    return {"params": args.tables * args.rows * args.dim, "init_s": init_s,
            "step_s": report.median(step_s), "losses": losses, "servers": servers,
            "worker_built_MB": built_mb, "worker_peak_MB": _self_peak() / MB}


def server_row(index: int, child: procs.Child, args) -> dict:
    """One server's resident memory against 1.3 x its rows' bytes + 300 MB."""
    held = sum(FixedLayout(f"tables.{t}", args.rows, args.servers).rows_on(index)
               for t in range(args.tables))
    rows_bytes = held * (4 * args.dim + STATE_BYTES[args.optimizer](args.dim))
    bound = 1.3 * rows_bytes + 300 * MB
    rss, peak = child.rss_bytes(), child.peak_rss_bytes()
    return {"server": index, "rows": report.human(held), "rows_MB": rows_bytes / MB,
            "rss_MB": rss / MB, "peak_MB": peak / MB, "bound_MB": bound / MB,
            "peak_over_rows": (peak - 300 * MB) / rows_bytes, "within": peak <= bound}


def main() -> None:
    parser = report.parser(__doc__, "200K rows x dim 16, 2 steps")
    parser.add_argument("--rows", default="62.5M", help="rows per table")
    parser.add_argument("--tables", type=int, default=1)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2048, help="samples per step")
    parser.add_argument("--bag", type=int, default=8, help="ids per sample and table")
    parser.add_argument("--optimizer", choices=sorted(STATE_BYTES), default="adagrad")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    if args.small:
        args.rows, args.steps = "200K", 2
    args.rows = report.parse_count(str(args.rows))
    print(f"{args.tables} x {report.human(args.rows)} rows x dim {args.dim} = "
          f"{report.human(args.tables * args.rows * args.dim)} parameters on {args.servers} "
          f"servers, {args.optimizer}", flush=True)
    result = run(args)
    summary = report.Table("sparse (c): a billion parameters (1 worker, sync)",
                           ["params", "optimizer", "init_s", "step_s", "loss_first", "loss_last",
                            "worker_peak_MB", "servers_within"])
    summary.add(params=report.human(result["params"]), optimizer=args.optimizer,
                init_s=result["init_s"], step_s=result["step_s"], loss_first=result["losses"][0],
                loss_last=result["losses"][-1], worker_peak_MB=result["worker_peak_MB"],
                servers_within=all(r["within"] for r in result["servers"]))
    memory = report.Table("sparse (c): server resident memory vs 1.3 x rows' bytes + 300 MB",
                          ["server", "rows", "rows_MB", "rss_MB", "peak_MB", "bound_MB",
                           "peak_over_rows", "within"])
    for row in result["servers"]:
        memory.add(**row)
    report.write("sparse_huge", [summary, memory], vars(args), extra={"run": result},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()
