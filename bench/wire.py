"""wire: push + pull of P parameters between one worker and S servers, per transport dtype.

shardps (the real PSClient against real `shardps-server` subprocesses) is timed against two
baselines in the same run and the same process shape (one worker process, S server
subprocesses, each holding its share): raw TCP sockets (`sendall` from and `recv_into` tensors,
casting like a server must) and bare gRPC (streams of raw bytes with identity serializers, no
protobuf and no shard logic: the transport's own ceiling). Repetitions interleave the three.

The servers run a sync job with two declared workers and the timed push is worker 0's, which
is received, decoded and checked in full but only buffered; an untimed push of worker 1 then
closes the round (Adam), so the timed numbers are the wire's. `python -m bench.apply` times
the apply.

  python -m bench.wire                      # 10M and 100M, S = 1 2 4, fp32 and bf16
  python -m bench.wire --small              # seconds, for CI
  python -m bench.wire --levers             # chunk size, experiments, channels, options
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from concurrent import futures

import grpc
import torch

from bench import peer as peer_lib
from bench import procs, report
from shardps.proto import codec, common_pb2, ps_pb2
from shardps.psclient import PSClient

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
JOB = "bench-wire"


class Baselines:
    """Clients of the raw-socket and bare-gRPC peers of one S: connections per server."""

    def __init__(self, peers: list[procs.Child], shards: common_pb2.ShardMap, chunk_bytes: int,
                 grpc_options: str = "", channels: int = 1):
        self.shards = list(shards.shards)
        self.chunk_bytes = chunk_bytes
        self.sockets, self.pushes, self.pulls, self.grpc_channels = [], [], [], []
        options = peer_lib.grpc_options(grpc_options)
        for child in peers:
            raw, bare = child.address, child.lines[0].split("grpc=")[1]
            sock = socket.create_connection(tuple(raw.rsplit(":", 1)))  # type: ignore[arg-type]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets.append(sock)
            pushes, pulls = [], []
            for c in range(channels):
                channel = grpc.insecure_channel(bare, options=[*options, ("bench.channel", c)])
                self.grpc_channels.append(channel)
                identity = lambda b: b  # noqa: E731
                pushes.append(channel.stream_unary(f"/{peer_lib.SERVICE}/Push", identity, identity))
                pulls.append(channel.unary_stream(f"/{peer_lib.SERVICE}/Pull", identity, identity))
            self.pushes.append(pushes)
            self.pulls.append(pulls)
        self.pool = futures.ThreadPoolExecutor(max(1, len(peers)))
        self.scratch: dict[torch.dtype, torch.Tensor] = {}

    def close(self) -> None:
        self.pool.shutdown()
        for sock in self.sockets:
            sock.close()
        for channel in self.grpc_channels:
            channel.close()

    def _wire(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        if dtype not in self.scratch or self.scratch[dtype].numel() < n:
            self.scratch[dtype] = torch.empty(n, dtype=dtype)
        return self.scratch[dtype][:n]

    # raw sockets: the bytes go from the tensor to the kernel and from the kernel into the tensor

    def raw_push(self, grad: torch.Tensor, dtype: torch.dtype) -> None:
        src = grad if dtype == torch.float32 else self._wire(dtype, grad.numel()).copy_(grad)

        def one(i: int) -> None:
            shard, sock = self.shards[i], self.sockets[i]
            part = src[shard.offset : shard.offset + shard.length]
            sock.sendall(peer_lib.HEADER.pack(b"P", peer_lib.CODES[dtype], part.numel() * dtype.itemsize))
            sock.sendall(peer_lib.as_bytes(part))
            if sock.recv(1) != b"k":
                raise ConnectionError("raw push not acknowledged")

        list(self.pool.map(one, range(len(self.shards))))

    def raw_pull(self, dest: torch.Tensor, dtype: torch.dtype) -> None:
        wire = dest if dtype == torch.float32 else self._wire(dtype, dest.numel())

        def one(i: int) -> None:
            shard, sock = self.shards[i], self.sockets[i]
            part = wire[shard.offset : shard.offset + shard.length]
            sock.sendall(peer_lib.HEADER.pack(b"L", peer_lib.CODES[dtype], part.numel() * dtype.itemsize))
            peer_lib.recv_exact(sock, peer_lib.as_bytes(part))
            if dtype != torch.float32:
                dest[shard.offset : shard.offset + shard.length].copy_(part)

        list(self.pool.map(one, range(len(self.shards))))

    # bare gRPC: the same streams as shardps, minus protobuf and the shard

    def _ranges(self, shard: common_pb2.ShardRange) -> list[tuple[int, int]]:
        k = len(self.pushes[0])
        return [(shard.length * c // k, shard.length * (c + 1) // k) for c in range(k)]

    def bare_push(self, grad: torch.Tensor, dtype: torch.dtype) -> None:
        step = max(1, self.chunk_bytes // dtype.itemsize)
        calls = []
        for i, shard in enumerate(self.shards):
            part = grad[shard.offset : shard.offset + shard.length]
            for c, (lo, hi) in enumerate(self._ranges(shard)):
                def messages(part=part, lo=lo, hi=hi):
                    scratch = None if dtype == torch.float32 else torch.empty(min(step, hi - lo), dtype=dtype)
                    first = bytes([peer_lib.CODES[dtype]])
                    for start in range(lo, hi, step):
                        piece = part[start : min(start + step, hi)]
                        if scratch is not None:
                            piece = scratch[: piece.numel()].copy_(piece)
                        yield b"".join((first, peer_lib.OFFSET.pack(start), peer_lib.as_bytes(piece)))
                        first = b""
                calls.append(self.pushes[i][c].future(messages(), timeout=600))
        for call in calls:
            call.result()

    def bare_pull(self, dest: torch.Tensor, dtype: torch.dtype) -> None:
        streams = []
        for i, shard in enumerate(self.shards):
            for c, (lo, hi) in enumerate(self._ranges(shard)):
                request = struct.pack("<BQQQ", peer_lib.CODES[dtype], self.chunk_bytes, lo, hi)
                streams.append((shard.offset, self.pulls[i][c](request, timeout=600)))
        for base, stream in streams:
            for message in stream:
                (offset,) = peer_lib.OFFSET.unpack_from(message)
                values = torch.frombuffer(message, dtype=dtype, offset=peer_lib.OFFSET.size)
                dest[base + offset : base + offset + values.numel()].copy_(values)


def sync_config() -> ps_pb2.ShardConfig:
    return ps_pb2.ShardConfig(
        optimizer=common_pb2.OptimizerConfig(name="adam", lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8),
        mode=common_pb2.CONSISTENCY_SYNC, workers=["w0", "w1"], epoch=1, layout_fingerprint="bench")


class ShardpsRounds:
    """Timed push (worker 0, buffered) and pull, then an untimed push of worker 1 that closes
    the sync round, so that every timed round starts from a fresh version. Over the servers'
    data planes (the default) or, `data_plane=False`, over the Push and Pull RPCs."""

    def __init__(self, smap: common_pb2.ShardMap, wire: int, chunk_bytes: int, first_step: int):
        self.clients = {plane: [PSClient(JOB, smap, dtype=wire, chunk_bytes=chunk_bytes,
                                         worker_id=w, data_plane=plane) for w in ("w0", "w1")]
                        for plane in (True, False)}
        self.step = first_step

    def __call__(self, grad: torch.Tensor, dest: torch.Tensor, data_plane: bool = True) -> tuple[float, float]:
        w0, w1 = self.clients[data_plane]
        t0 = time.perf_counter()
        replies = w0.push(grad, step=self.step, base_version=self.step, batch_size=1)
        t1 = time.perf_counter()
        result = w0.pull(dest, min_version=0, timeout_s=60)
        t2 = time.perf_counter()
        assert all(r.status == ps_pb2.PUSH_STATUS_ACCEPTED for r in replies), replies
        assert result.ready
        w1.push(grad, step=self.step, base_version=self.step, batch_size=1)
        self.step += 1
        return t1 - t0, t2 - t1

    def close(self) -> None:
        for pair in self.clients.values():
            for client in pair:
                client.close()


def _timed(push, pull, grad: torch.Tensor, dest: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    t0 = time.perf_counter()
    push(grad, dtype)
    t1 = time.perf_counter()
    pull(dest, dtype)
    return t1 - t0, time.perf_counter() - t1


def measure(params: int, servers: int, dtypes: list[str], repeats: int, chunk_bytes: int,
            baselines: bool = True, grpc_options: str = "", channels: int = 1,
            server_threads: int = 1) -> list[dict]:
    """Median push / pull / both GB/s of shardps and the baselines for one (P, S), per dtype."""
    grad = torch.randn(params) * 1e-3
    dest = torch.empty(params)
    servers_ = procs.start_servers(servers, threads=server_threads)
    peers = [procs.Child("bench.peer", ["--elements", str(s.length), "--grpc-options", grpc_options])
             for s in procs.shard_map(["x:1"] * servers, params).shards] if baselines else []
    smap = procs.shard_map([s.address for s in servers_], params)
    rows = []
    base = Baselines(peers, smap, chunk_bytes, grpc_options, channels) if baselines else None
    step = 0
    try:
        with PSClient(JOB, smap, worker_id="w0") as init:
            init.init(torch.zeros(params), sync_config())
        for name in dtypes:
            dtype = DTYPES[name]
            nbytes = params * dtype.itemsize
            rounds = ShardpsRounds(smap, codec.DTYPE_NAMES[name], chunk_bytes, step)
            kinds = {"shardps": lambda rounds=rounds: rounds(grad, dest),
                     "shardps_rpc": lambda rounds=rounds: rounds(grad, dest, data_plane=False)}
            if base is not None:
                kinds["raw"] = lambda dtype=dtype: _timed(base.raw_push, base.raw_pull, grad, dest, dtype)
                kinds["grpc"] = lambda dtype=dtype: _timed(base.bare_push, base.bare_pull, grad, dest, dtype)
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
            order = list(kinds)
            for kind in order:  # warm-up: page faults, connections, the first Adam state
                kinds[kind]()
            for rep in range(repeats):  # interleaved, rotating who goes first
                for kind in order[rep % len(order):] + order[: rep % len(order)]:
                    samples[kind].append(kinds[kind]())
            rounds.close()
            step = rounds.step
            row = {"params": report.human(params), "servers": servers, "dtype": name,
                   "MB": round(nbytes / 1e6)}
            for kind, values in samples.items():
                row[f"{kind}_push"] = report.median([nbytes / p / 1e9 for p, _ in values])
                row[f"{kind}_pull"] = report.median([nbytes / q / 1e9 for _, q in values])
                row[f"{kind}_GBps"] = report.median([2 * nbytes / (p + q) / 1e9 for p, q in values])
            if base is not None:
                for mine, other, key in (("shardps", "raw", "vs_raw"), ("shardps", "grpc", "vs_grpc"),
                                         ("shardps_rpc", "raw", "rpc_vs_raw")):
                    row[key] = report.median([(o[0] + o[1]) / (s[0] + s[1]) for s, o in
                                              zip(samples[mine], samples[other], strict=True)])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if base is not None:
            base.close()
        procs.stop_all(servers_)
        procs.stop_all(peers)
    return rows


LEVERS = [
    # (name, environment, extra arguments); each runs in fresh processes
    ("defaults (1 MiB chunks, 1 server thread)", {}, []),
    ("chunk 256 KiB", {}, ["--chunk-bytes", "256K"]),
    ("chunk 512 KiB", {}, ["--chunk-bytes", "512K"]),
    ("chunk 2 MiB", {}, ["--chunk-bytes", "2M"]),
    ("chunk 4 MiB", {}, ["--chunk-bytes", "4M"]),
    ("chunk 8 MiB", {}, ["--chunk-bytes", "8M"]),
    ("server --threads 2", {}, ["--server-threads", "2"]),
    ("GRPC_EXPERIMENTS=tcp_frame_size_tuning", {"GRPC_EXPERIMENTS": "tcp_frame_size_tuning"}, []),
    ("GRPC_EXPERIMENTS=tcp_rcv_lowat", {"GRPC_EXPERIMENTS": "tcp_rcv_lowat"}, []),
    ("bare gRPC: 2 channels per server", {}, ["--channels", "2"]),
    ("bare gRPC: 4 channels per server", {}, ["--channels", "4"]),
    ("bare gRPC: http2 max_frame_size 4 MiB", {}, ["--grpc-options", "frame"]),
    ("bare gRPC: tcp read chunks up to 4 MiB", {}, ["--grpc-options", "read"]),
]


def levers(args) -> list[dict]:
    """Each lever against the defaults, in fresh processes (environment variables act at gRPC
    start), alternating lever and default runs `--pairs` times; same P, S=1, fp32. The gain is
    the median over pairs of lever / default push+pull throughput, run next to each other.

    With --before-tree, a first row runs shardps from that tree (PYTHONPATH), e.g. the code
    before this bench's changes: `git archive REV | tar -x -C T`, then a T/path/shardps/ with
    a link to each of the tree's package folders (pyproject's package-dir): proto, runtime,
    psclient, server, worker and client, e.g. psclient -> T/psclient.
    """
    cases = [case for case in LEVERS if case[2] or case[1]]
    if args.before_tree:
        cases.insert(0, (f"before (shardps from {args.before_tree})", {"PYTHONPATH": args.before_tree}, []))

    def one(env: dict, extra: list[str]) -> dict:
        command = [sys.executable, "-m", "bench.wire", "--params", args.params.split(",")[0],
                   "--servers", "1", "--dtypes", "float32", "--repeats", str(args.repeats),
                   "--rows-only", *extra]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env},
                             timeout=3600)
        if out.returncode != 0:
            raise RuntimeError(f"{command} failed:\n{out.stdout}\n{out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for name, env, extra in cases:
        pairs = [(one(env, extra), one({}, [])) for _ in range(args.pairs)]
        lever = [p[0] for p in pairs]
        # The levers are gRPC's: their gain is that of shardps over the Push and Pull RPCs.
        row = {"lever": name, "gain": report.median([a["shardps_rpc_GBps"] / b["shardps_rpc_GBps"]
                                                     for a, b in pairs]),
               "grpc_gain": report.median([a["grpc_GBps"] / b["grpc_GBps"] for a, b in pairs]),
               **{k: report.median([r[k] for r in lever]) for k in ("shardps_rpc_GBps", "raw_GBps", "grpc_GBps",
                                                                      "rpc_vs_raw", "vs_grpc")}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = report.parser(__doc__, "1M, S=1 2")
    parser.add_argument("--params", default="10M,100M", help="comma-separated sizes (default 10M,100M)")
    parser.add_argument("--servers", default="1,2,4", help="comma-separated server counts")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="transport dtypes")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--chunk-bytes", default="1M", help="chunk size (default 1MiB, as shardps)")
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1, help="bare gRPC: channels per server")
    parser.add_argument("--grpc-options", default="", help="bare gRPC: frame,read,wbuf")
    parser.add_argument("--levers", action="store_true", help="measure the levers instead (S=1, first P)")
    parser.add_argument("--before-tree", default="", help="with --levers: also run shardps from this PYTHONPATH")
    parser.add_argument("--pairs", type=int, default=3, help="with --levers: lever/default run pairs")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.small:
        args.params, args.servers, args.repeats = "1M", "1,2", 2
    chunk_bytes = report.parse_bytes(args.chunk_bytes)
    config = vars(args).copy()
    if args.levers:
        table = report.Table("wire levers: fp32, 1 server; gain = lever / defaults, run in alternation",
                             ["lever", "gain", "grpc_gain", "shardps_rpc_GBps", "raw_GBps", "grpc_GBps",
                              "rpc_vs_raw", "vs_grpc"])
        for row in levers(args):
            table.add(**row)
        report.write("wire_levers", [table], config, out_dir=args.out_dir, module="wire")
        return
    rows = []
    for params in map(report.parse_count, args.params.split(",")):
        for servers in map(int, args.servers.split(",")):
            rows += measure(params, servers, args.dtypes.split(","), args.repeats, chunk_bytes,
                            grpc_options=args.grpc_options, channels=args.channels,
                            server_threads=args.server_threads)
    if args.rows_only:
        return
    table = report.Table("wire: push + pull, one worker, S servers (GB/s, median)",
                         ["params", "servers", "dtype", "MB", "shardps_push", "shardps_pull",
                          "shardps_GBps", "shardps_rpc_GBps", "raw_GBps", "grpc_GBps", "vs_raw",
                          "rpc_vs_raw", "vs_grpc"])
    for row in rows:
        table.add(**row)
    report.write("wire", [table], config, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
