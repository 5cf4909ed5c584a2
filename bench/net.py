"""net: steady-state step time on emulated links: 2 workers (and, for shardps, 2 servers), each
on its own network-namespace host, every host's link shaped to --rate (and --delay: each link
is then bench/tunlink.py's userspace link). DDP over gloo in fp32, with fp16_compress_hook and
with powerSGD_hook, against shardps (sync; fp32, fp32 with transport.overlap, and int8 with
error feedback both ways); ratios against DDP fp32 of the same run. Needs root.

  python -m bench.net                          # ~10M-parameter MLP, 1gbit links
  python -m bench.net --params 100M --rate 10gbit
  python -m bench.net --small                  # ~80K parameters, 3 timed steps
  python -m bench.net --params 100M --warmup 8 --steps 10   # steadier medians

Step time is rank 0's median; wire MB is what rank 0's link carried per step, both
directions (DDP's ring: about 2x the gradient per worker; shardps: one push and one pull);
worker CPU is rank 0's process CPU time per step (all its threads), which says how much of
the step the worker computed and how much it waited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

from bench import netns, procs, report

HOSTS = ["w0", "w1", "s0", "s1"]
SYSTEMS = {  # name: (role, hook)
    "DDP gloo fp32": ("ddp", "none"),
    "DDP fp16_compress_hook": ("ddp", "fp16"),
    "DDP powerSGD_hook (rank 1)": ("ddp", "powersgd"),
    "shardps fp32 (2 servers)": ("ps", "none"),
    "shardps fp32 overlap (2 servers)": ("ps", "overlap"),  # transport.overlap: true
    "shardps int8+EF both ways (2 servers)": ("ps", "int8"),  # transport.compress(_pull): int8
    # sign pushes of the workers' momentum (optimizer.worker_momentum), int8 pull deltas
    "shardps sign+momentum push; int8 pull (2 servers)": ("ps", "sign/int8"),
    "shardps sign+momentum push; sign:32 pull (2 servers)": ("ps", "sign/sign:32"),
    "shardps sign+momentum push; fp32 pull (2 servers)": ("ps", "sign/none"),
}


RANK_MODULE = "bench.netrank"


def _rank_args(args, role: str, rank: int, extra: Sequence[str] = ()) -> list[str]:
    """bench.netrank's arguments for one rank."""
    return [role, "--rank", str(rank), "--world", "2", "--params", str(args.params),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--timeout", str(args.timeout), *extra]


def _rank_command(args, role: str, rank: int, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one rank, run with this interpreter."""
    return [sys.executable, "-m", RANK_MODULE, *_rank_args(args, role, rank, extra)]


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    """The JSON line a rank printed last, after it exits."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"rank exited {proc.returncode}:\n{out[-2000:]}\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def run_ddp(net: netns.Network, args, hook: str) -> dict:
    store = f"{net.address('w0')}:0"
    rank0 = procs.Child(RANK_MODULE, _rank_args(args, "ddp", 0, ["--store", store, "--hook", hook]),
                        env={"GLOO_SOCKET_IFNAME": "eth0"}, timeout=args.timeout, prefix=net.command("w0"))
    try:
        rank1 = net.popen("w1", *_rank_command(args, "ddp", 1, ["--store", rank0.address, "--hook", hook]),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**_env(), "GLOO_SOCKET_IFNAME": "eth0"})
        _result(rank1, args.timeout * 3)
        if rank0.proc.wait(args.timeout) != 0:
            raise RuntimeError("DDP rank 0 failed:\n" + "\n".join(rank0.lines[-30:]))
        rank0.stop()  # joins its output reader
        return json.loads(rank0.lines[-1])
    finally:
        rank0.stop()


def run_shardps(net: netns.Network, args, codec: str = "none") -> dict:
    servers = [procs.Child("shardps-server", ["--coordinator", "", "--host", net.address(h), "--port", "0",
                                              "--threads", "1", "--log-level", "WARNING"],
                           timeout=args.timeout, prefix=net.command(h))
               for h in ("s0", "s1")]
    try:
        addresses = ",".join(s.address for s in servers)
        push, _, pull = codec.partition("/")
        extra = (["--servers", addresses, "--overlap"] if codec == "overlap" else
                 ["--servers", addresses, "--compress", push, "--compress-pull", pull or push,
                  *(["--worker-momentum"] if pull else [])])
        net.run("w0", *_rank_command(args, "ps-init", 0, ["--servers", addresses, *extra[2:]]), timeout=args.timeout)
        ranks = [net.popen(h, *_rank_command(args, "ps", r, extra), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_env()) for r, h in enumerate(("w0", "w1"))]
        return [_result(p, args.timeout * 3) for p in ranks][0]
    finally:
        procs.stop_all(servers)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def main() -> None:
    parser = report.parser(__doc__, "~80K parameters, 3 timed steps")
    parser.add_argument("--params", default="10M", help="MLP size (default 10M)")
    parser.add_argument("--rate", default="1gbit", help="each host's link rate, tc syntax (default 1gbit)")
    parser.add_argument("--delay", default="", help="one-way delay added to what each host sends, tc syntax (e.g. 5ms)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (the momentum rows freeze the variance after warmup - 1; "
                             "at 100M a freeze after 1 diverges within about 8 steps, after 7 it ran 10)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds any one wait may take")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which rows, comma-separated")
    args = parser.parse_args()
    if args.small:
        args.params, args.steps = "80K", 3
    args.params = report.parse_count(args.params)
    if why := netns.why_unavailable():
        parser.error(f"network namespaces unavailable: {why}")
    title = f"net: 2 workers on {args.rate} links{' +' + args.delay if args.delay else ''}, " \
            f"{report.human(args.params)}-parameter MLP (step ms, median of {args.steps})"
    table = report.Table(title, ["system", "step_ms", "wire_MB_per_step", "worker_cpu_ms", "vs_ddp_fp32"])
    with netns.Network(HOSTS) as net:
        for host in HOSTS:
            net.shape(host, rate=args.rate, delay=args.delay or None)
        for name in args.systems.split(","):
            role, hook = SYSTEMS[name]
            result = run_ddp(net, args, hook) if role == "ddp" else run_shardps(net, args, hook)
            table.add(system=name, step_ms=result["step_s"] * 1e3,
                      wire_MB_per_step=result["bytes_per_step"] / 1e6, worker_cpu_ms=result["cpu_s_per_step"] * 1e3)
            print(table.rows[-1], flush=True)
    base = next((r["step_ms"] for r in table.rows if r["system"] == "DDP gloo fp32"), float("nan"))
    for row in table.rows:
        row["vs_ddp_fp32"] = row["step_ms"] / base
    report.write("net", [table], vars(args), out_dir=args.out_dir)


if __name__ == "__main__":
    main()
