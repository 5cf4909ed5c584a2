"""The baselines' server side, one subprocess per server: a raw TCP sink/echo and a bare gRPC
service (identity serializers, no protobuf, no shard logic) over one fp32 tensor of its share.

  python -m bench.peer --elements N [--grpc-options frame,read]

prints `listening on 127.0.0.1:RAW_PORT grpc=127.0.0.1:GRPC_PORT`. Both move exactly what a
parameter server moves: a push lands in the fp32 tensor (cast from the wire dtype), a pull
sends it (cast to the wire dtype). Raw protocol: a 16-byte header `op dtype pad u64 nbytes`,
then the payload; a push is acknowledged with one byte.
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading
import warnings
from concurrent import futures

import grpc
import torch

warnings.filterwarnings("ignore", message="The given buffer is not writable")

HEADER = struct.Struct("<cB6xQ")
DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
CODES = {v: k for k, v in DTYPES.items()}
SERVICE = "bench.Bare"
OFFSET = struct.Struct("<Q")


def grpc_options(names: str) -> list[tuple[str, int]]:
    """Channel/server options of the bare gRPC baseline, by short name (the levers in perf.md)."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    for name in filter(None, names.split(",")):
        options += {
            "frame": [("grpc.http2.max_frame_size", 4 << 20)],
            "read": [("grpc.experimental.tcp_max_read_chunk_size", 4 << 20),
                     ("grpc.experimental.tcp_min_read_chunk_size", 256 << 10)],
            "wbuf": [("grpc.http2.write_buffer_size", 4 << 20)],
        }[name]
    return options


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, 4 << 20))
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def as_bytes(t: torch.Tensor) -> memoryview:
    return t.view(torch.uint8).numpy().data


class Peer:
    def __init__(self, elements: int):
        self.weights = torch.randn(elements)
        self.staging = torch.empty(elements)
        self.wire = {torch.bfloat16: torch.empty(elements, dtype=torch.bfloat16),
                     torch.float16: torch.empty(elements, dtype=torch.float16)}

    # -- raw socket --

    def serve_raw(self, conn: socket.socket) -> None:
        header = bytearray(HEADER.size)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    recv_exact(conn, memoryview(header))
                except ConnectionError:
                    return
                op, code, nbytes = HEADER.unpack(header)
                dtype = DTYPES[code]
                n = nbytes // dtype.itemsize
                if op == b"P":
                    dest = self.staging[:n] if dtype == torch.float32 else self.wire[dtype][:n]
                    recv_exact(conn, as_bytes(dest))
                    if dtype != torch.float32:
                        self.staging[:n].copy_(dest)
                    conn.sendall(b"k")
                else:
                    src = self.weights[:n]
                    if dtype != torch.float32:
                        src = self.wire[dtype][:n].copy_(src)
                    conn.sendall(as_bytes(src))

    # -- bare gRPC --

    def push(self, messages, context) -> bytes:
        dtype = None
        for message in messages:
            if dtype is None:
                dtype = DTYPES[message[0]]
                message = message[1:]
            (offset,) = OFFSET.unpack_from(message)
            values = torch.frombuffer(message, dtype=dtype, offset=OFFSET.size)
            self.staging[offset : offset + values.numel()].copy_(values)
        return b"k"

    def pull(self, request: bytes, context):
        code, chunk_bytes, lo, hi = struct.unpack("<BQQQ", request)
        dtype = DTYPES[code]
        step = max(1, chunk_bytes // dtype.itemsize)
        scratch = torch.empty(max(1, min(step, hi - lo)), dtype=dtype)
        for start in range(lo, hi, step):
            piece = self.weights[start : min(start + step, hi)]
            if dtype != torch.float32:
                piece = scratch[: piece.numel()].copy_(piece)
            yield b"".join((OFFSET.pack(start), as_bytes(piece)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, required=True)
    parser.add_argument("--grpc-options", default="")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peer = Peer(args.elements)

    identity = lambda b: b  # noqa: E731 - the point: no (de)serialization at all
    server = grpc.server(futures.ThreadPoolExecutor(16), options=grpc_options(args.grpc_options))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Push": grpc.stream_unary_rpc_method_handler(peer.push, identity, identity),
        "Pull": grpc.unary_stream_rpc_method_handler(peer.pull, identity, identity),
    }),))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    listener = socket.create_server(("127.0.0.1", 0))
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]} grpc=127.0.0.1:{grpc_port}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=peer.serve_raw, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
