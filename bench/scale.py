"""scale: the largest model shardps trains here, with 4 servers and 1 worker, and each server's
resident memory against the 12 bytes per parameter its state needs (fp32 weights, Adam m, v).

The worker is this process (shardps's FlatParams and PSClient, as `shardps-worker` runs
them); the servers are real `shardps-server`s (sync job, one worker). The model is a plain
MLP trained on one fixed random batch, so the loss must fall if the updates are right. Each
server's VmRSS (now) and VmHWM (peak) are read from /proc after the last step and compared
with 1.25 x its share of weights + Adam state + 300 MB (the acceptance bound, whose 300 MB
covers the interpreter, torch and gRPC: an idle server is about 250 MB).

  python -m bench.scale                         # 300M parameters, 5 steps, fp32 and bf16 wire
  python -m bench.scale --params 600M --dtypes bfloat16
  python -m bench.scale --small
"""

from __future__ import annotations

import gc
import os
import time

import torch
from torch import nn

from bench import procs, report
from shardps.proto import codec, common_pb2, ps_pb2
from shardps.psclient import PSClient
from shardps.worker.flat import FlatParams

JOB = "bench-scale"
STATE_BYTES = 12  # fp32 weights + Adam exp_avg + exp_avg_sq per parameter
BATCH = 8
LAYERS = 5


def model_of(params: int) -> tuple[nn.Module, int]:
    """LAYERS square ReLU layers of width w (about params parameters) and a 10-way head."""
    width = max(64, round((params / LAYERS) ** 0.5 / 64) * 64)
    layers: list[nn.Module] = []
    for _ in range(LAYERS):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    with torch.device("meta"):  # shapes only: FlatParams allocates the real storage once
        model = nn.Sequential(*layers)
    return model, width


def materialize(model: nn.Module) -> FlatParams:
    """FlatParams of a meta-device model, initialised in place (no second copy of the weights)."""
    model.to_empty(device="cpu")
    flat = FlatParams(model)  # copies the (garbage) params into one flat buffer, then views
    gc.collect()
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # views into flat: initialised in place
                bound = 1 / module.in_features ** 0.5
                module.weight.uniform_(-bound, bound)
                module.bias.uniform_(-bound, bound)
    return flat


def run(params: int, dtype: str, steps: int, servers: int, lr: float) -> dict:
    model, width = model_of(params)
    flat = materialize(model)
    total = flat.numel
    x = torch.randn(BATCH, width, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(2))
    children = procs.start_servers(servers, threads=1, metrics=True)
    losses, step_s = [], []
    try:
        smap = procs.shard_map([c.address for c in children], total)
        ps = PSClient(JOB, smap, dtype=codec.DTYPE_NAMES[dtype], worker_id="w0")
        ps.init(flat.flat, ps_pb2.ShardConfig(
            optimizer=common_pb2.OptimizerConfig(name="adam", lr=lr, beta1=0.9, beta2=0.999, eps=1e-8),
            mode=common_pb2.CONSISTENCY_SYNC, workers=["w0"], epoch=1, layout_fingerprint="bench"))
        for step in range(steps + 1):  # one more pull at the end: the loss of the last update
            start = time.perf_counter()
            result = ps.pull(flat.host_weights, min_version=step, timeout_s=300)
            assert result.ready, result
            flat.upload()
            flat.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            losses.append(float(loss.detach()))
            if step == steps:
                break
            loss.backward()
            replies = ps.push(flat.host_grad(), step=step, base_version=step, batch_size=BATCH)
            assert all(r.status == ps_pb2.PUSH_STATUS_APPLIED for r in replies), replies
            step_s.append(time.perf_counter() - start)
            print(f"  step {step}: loss {losses[-1]:.4f} ({step_s[-1]:.1f} s)", flush=True)
        ps.close()
        shares = [s.length for s in smap.shards]
        rows = []
        for i, (child, share) in enumerate(zip(children, shares, strict=True)):
            state = STATE_BYTES * share
            limit = 1.25 * state + 300e6
            rss, peak = child.rss_bytes(), child.peak_rss_bytes()
            rows.append({"server": i, "share": report.human(share), "state_MB": state / 1e6,
                         "rss_MB": rss / 1e6, "peak_MB": peak / 1e6, "limit_MB": limit / 1e6,
                         "peak_over_state": (peak - 300e6) / state, "within": peak <= limit})
    finally:
        procs.stop_all(children)
    return {"params": total, "width": width, "dtype": dtype, "losses": losses,
            "loss_decreasing": all(b < a for a, b in zip(losses, losses[1:], strict=False)),
            "step_s": report.median(step_s), "servers": rows,
            "worker_peak_MB": _self_peak() / 1e6}


def _self_peak() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = report.parser(__doc__, "2M, 2 steps")
    parser.add_argument("--params", default="300M")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5,
                        help="Adam lr (default 2e-5: the loss falls every step, not to 0 and back)")
    args = parser.parse_args()
    if args.small:
        args.params, args.steps = "2M", 2
    summary = report.Table("scale: training runs (4 servers, 1 worker)",
                           ["params", "dtype", "step_s", "loss_first", "loss_last", "loss_decreasing",
                            "worker_peak_MB", "servers_within"])
    memory = report.Table("scale: server resident memory vs 1.25 x state + 300 MB",
                          ["params", "dtype", "server", "share", "state_MB", "rss_MB", "peak_MB",
                           "limit_MB", "peak_over_state", "within"])
    runs = []
    for params in map(report.parse_count, args.params.split(",")):
        for dtype in args.dtypes.split(","):
            print(f"{report.human(params)} parameters, {dtype} on the wire", flush=True)
            result = run(params, dtype, args.steps, args.servers, args.lr)
            runs.append(result)
            summary.add(params=report.human(result["params"]), dtype=dtype, step_s=result["step_s"],
                        loss_first=result["losses"][0], loss_last=result["losses"][-1],
                        loss_decreasing=result["loss_decreasing"], worker_peak_MB=result["worker_peak_MB"],
                        servers_within=all(r["within"] for r in result["servers"]))
            for row in result["servers"]:
                memory.add(params=report.human(result["params"]), dtype=dtype, **row)
            gc.collect()
    report.write("scale", [summary, memory], vars(args), extra={"runs": runs}, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
