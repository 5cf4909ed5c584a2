"""Table payloads on the wire (ps.proto's InitRows, PullRows, PushRows): ids as int64 and rows
as fp32, little-endian, row-major. Decoding checks sizes only; what ids and rows must be
(sorted, in range, finite) is proto/tables.py's check_ids and check_rows."""

from __future__ import annotations

import sys

import torch

from shardps.proto.tables import TableRowsError

_LITTLE = sys.byteorder == "little"


def encode_ids(ids: torch.Tensor) -> bytes:
    return _bytes(ids.to(torch.int64))


def encode_rows(rows: torch.Tensor) -> bytes:
    return _bytes(rows.to(torch.float32))


def decode_ids(table: str, data: bytes) -> torch.Tensor:
    """int64 ids from `data`; TableRowsError unless it is a whole number of int64."""
    if len(data) % 8:
        raise TableRowsError(f"table {table!r}: ids must be int64 (8 bytes each), got "
                             f"{len(data)} bytes")
    return _tensor(data, torch.int64)


def decode_rows(table: str, data: bytes, dim: int) -> torch.Tensor:
    """fp32 rows [n, dim] from `data`; TableRowsError unless it is whole rows."""
    if len(data) % (4 * dim):
        raise TableRowsError(f"table {table!r}: rows must be fp32 [n, {dim}] ({4 * dim} bytes "
                             f"each), got {len(data)} bytes")
    return _tensor(data, torch.float32).view(-1, dim)


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if not _LITTLE:
        t = t.view(torch.uint8).view(-1, t.element_size()).flip(1)
    return t.numpy().tobytes()


def _tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if not _LITTLE:
        size = torch.empty(0, dtype=dtype).element_size()
        raw = raw.view(-1, size).flip(1).contiguous().flatten()
    return raw.view(dtype)
