"""Embedding tables: the contract both sides share (docs/tables.md).

How a table's ids map to servers and to rows on them, how a dynamic table's rows start, and
what a well-formed batch of ids and rows is. Workers use it to split a batch's ids between
servers and to check ids before they leave; servers use it to place, create and validate
rows; export uses it to put a fixed table's rows back in id order. Pure functions of their
arguments (no state, no RNG), so every process computes the same answer.

Ids are int64. All 64-bit hashing is done in int64 tensors with wrapping arithmetic; `shr_logical`
is the logical (unsigned) right shift that torch lacks for int64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

MAX_FIXED_ROWS = 1 << 62  # the Feistel domain must fit in a non-negative int64


def int64_of(value: int) -> int:
    """A Python int's low 64 bits as a signed int64 value (what a tensor op wraps to)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64 (Steele, Lea and Flood 2014; the constants of Vigna's reference implementation).
GOLDEN_GAMMA = int64_of(0x9E3779B97F4A7C15)
_MUL1 = int64_of(0xBF58476D1CE4E5B9)
_MUL2 = int64_of(0x94D049BB133111EB)
# Salts keep the hash of one use independent of another (sharding vs rows vs Feistel rounds).
_SALT_INIT = int64_of(0x2545F4914F6CDD1D)
_FEISTEL_ROUNDS = 4
_INIT_CHUNK = 1 << 18  # draws per init_rows chunk (a few MiB of temporaries)


class TableIdError(IndexError, ValueError):
    """An id a table cannot have: out of a fixed table's range, or not on this server.

    `table` and `id` name the offender (the first one in the batch); the message says both.
    """

    def __init__(self, table: str, id: int, message: str):
        super().__init__(f"table {table!r}: id {id} {message}")
        self.table = table
        self.id = id


class TableRowsError(ValueError):
    """A malformed batch of ids or rows (dtype, shape, order, non-finite values)."""


# -- 64-bit hashing --------------------------------------------------------------------------


def shr_logical(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's `>>` is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function of state `x` (int64, wrapping): a bijection of 64-bit
    values whose every output bit depends on every input bit."""
    z = x + GOLDEN_GAMMA
    z = (z ^ shr_logical(z, 30)) * _MUL1
    z = (z ^ shr_logical(z, 27)) * _MUL2
    return z ^ shr_logical(z, 31)


def mix64_int(x: int) -> int:
    """`mix64` of one Python int, as a signed 64-bit value (the reference the tests check)."""
    z = (x + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return int64_of(z ^ (z >> 31))


def name_key(name: str) -> int:
    """A table name's 64-bit key (signed): the first 8 bytes of its BLAKE2b, little-endian."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little",
                          signed=True)


# -- dynamic tables: which server holds an id -------------------------------------------------


def dynamic_server_of(table: str, ids: torch.Tensor, num_servers: int) -> torch.Tensor:
    """The server index (int64) of each id of a dynamic table: the top 63 bits of
    mix64(id xor name_key(table)), mod num_servers.

    Any int64 id. Consecutive and strided ids spread like random ones, and two tables' hot ids
    land on unrelated servers.
    """
    if num_servers < 1:
        raise ValueError(f"num_servers must be >= 1, got {num_servers}")
    if num_servers == 1:
        return torch.zeros(ids.shape, dtype=torch.int64)
    return shr_logical(mix64(ids.to(torch.int64) ^ name_key(table)), 1) % num_servers


# -- fixed tables: a permutation of [0, N) dealt round-robin -----------------------------------


@dataclass(frozen=True)
class FixedLayout:
    """Where each row of a fixed table of `num_embeddings` rows lives on `num_servers` servers.

    pos = P(id) for a pseudo-random permutation P of [0, N) keyed by the table's name (a
    4-round Feistel network on the smallest even-split bit width holding N, cycle-walked into
    [0, N)); the row lives on server pos % S at slot pos // S. So servers hold N/S rows each
    (+-1) in dense tensors with no per-row index at all, a slot is computed rather than looked
    up (the cost of a lookup is the same at 1M and 100M rows), and consecutive or hot ids
    spread like random ones.
    """

    table: str
    num_embeddings: int
    num_servers: int

    def __post_init__(self) -> None:
        if not 0 < self.num_embeddings <= MAX_FIXED_ROWS:
            raise ValueError(f"table {self.table!r}: num_embeddings must be in [1, 2**62], "
                             f"got {self.num_embeddings}")
        if self.num_servers < 1:
            raise ValueError(f"num_servers must be >= 1, got {self.num_servers}")

    @property
    def _bits(self) -> tuple[int, int]:
        bits = max(2, (self.num_embeddings - 1).bit_length())
        return bits - bits // 2, bits // 2  # (high half, low half)

    @property
    def _keys(self) -> list[int]:
        base = name_key(self.table)
        return [mix64_int(base + round_) for round_ in range(_FEISTEL_ROUNDS)]

    def _rounds(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        hi_bits, lo_bits = self._bits
        hi, lo = x >> lo_bits, x & ((1 << lo_bits) - 1)
        order = range(_FEISTEL_ROUNDS - 1, -1, -1) if inverse else range(_FEISTEL_ROUNDS)
        keys = self._keys
        # Round function: the top bits of (half + key) * odd constant (multiplicative hashing:
        # every input bit reaches the top bits); 4 ops where mix64 takes 11.
        for round_ in order:  # each round is its own inverse given the other half
            if round_ % 2 == 0:
                hi = hi ^ shr_logical((lo + keys[round_]) * _MUL1, 64 - hi_bits)
            else:
                lo = lo ^ shr_logical((hi + keys[round_]) * _MUL1, 64 - lo_bits)
        return (hi << lo_bits) | lo

    def _walk(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        out = self._rounds(x, inverse)
        outside = (out >= self.num_embeddings).nonzero().flatten()
        while outside.numel():  # cycle walking: terminates, the cycle returns into [0, N)
            again = self._rounds(out.index_select(0, outside), inverse)
            out.index_copy_(0, outside, again)
            outside = outside[again >= self.num_embeddings]
        return out

    def position(self, ids: torch.Tensor) -> torch.Tensor:
        """P(id) for ids in [0, N) (int64; the caller checks the range, see `check_ids`)."""
        return self._walk(ids.to(torch.int64).flatten(), inverse=False).view(ids.shape)

    def place(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(server, slot) of each id in [0, N)."""
        pos = self.position(ids)
        if self.num_servers == 1:
            return torch.zeros_like(pos), pos
        return pos % self.num_servers, pos // self.num_servers

    def rows_on(self, server: int) -> int:
        """How many rows server `server` holds."""
        n, s = self.num_embeddings, self.num_servers
        return max(0, (n - server + s - 1) // s)

    def ids_on(self, server: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The ids held at slots [start, end) of server `server`, in slot order (int64)."""
        end = self.rows_on(server) if end is None else min(end, self.rows_on(server))
        if start >= end:
            return torch.zeros(0, dtype=torch.int64)
        pos = torch.arange(start, end, dtype=torch.int64) * self.num_servers + server
        return self._walk(pos, inverse=True)


def assemble_fixed(layout: FixedLayout, parts: dict[int, torch.Tensor]) -> torch.Tensor:
    """A fixed table's full weight [N, dim] (id order) from every server's rows in slot order."""
    if sorted(parts) != list(range(layout.num_servers)):
        raise ValueError(f"need the rows of servers 0..{layout.num_servers - 1}, got {sorted(parts)}")
    first = parts[0]
    out = torch.empty((layout.num_embeddings, *first.shape[1:]), dtype=first.dtype)
    for server, rows in parts.items():
        if rows.shape[0] != layout.rows_on(server):
            raise ValueError(f"server {server} sent {rows.shape[0]} rows, holds {layout.rows_on(server)}")
        out.index_copy_(0, layout.ids_on(server), rows)
    return out


def merge_dynamic(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One dynamic table's (ids ascending, rows) from every server's (ids, rows) pairs."""
    ids = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    rows = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, 0)
    ids, order = torch.sort(ids)
    return ids, rows.index_select(0, order)


# -- dynamic tables: initial rows -------------------------------------------------------------


@dataclass(frozen=True)
class RowInit:
    """How a dynamic table's row starts: "normal" (mean `a`, std `b`; the default is
    torch.nn.Embedding's N(0, 1)), "uniform" on [a, b), or "zeros"."""

    kind: str = "normal"
    a: float = 0.0
    b: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "uniform", "zeros"):
            raise ValueError(f"row init must be normal, uniform or zeros, got {self.kind!r}")
        if not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError("row init parameters must be finite")
        if self.kind == "normal" and self.b < 0:
            raise ValueError(f"normal row init needs std >= 0, got {self.b}")
        if self.kind == "uniform" and self.b < self.a:
            raise ValueError(f"uniform row init needs a <= b, got [{self.a}, {self.b})")


def init_rows(seed: int, table: str, ids: torch.Tensor, dim: int, init: RowInit) -> torch.Tensor:
    """The initial rows [n, dim] (fp32) of dynamic-table ids: a function of (seed, table, id)
    only, so a row starts the same on whichever server creates it, whenever it does.

    Element j of row `id` uses the splitmix64 stream seeded at s = mix64(id ^ k), where
    k = name_key(table) ^ mix64(seed) ^ SALT: draw t is h_t = mix64(s + t * GOLDEN).
    u_t = (h_t >>> 11) * 2**-53 in [0, 1). uniform: a + (b - a) * u_j. normal (Box-Muller):
    a + b * sqrt(-2 ln(1 - u_2j)) * cos(2 pi u_2j+1). Computed in float64, rounded to fp32.
    """
    out = torch.zeros((ids.numel(), dim), dtype=torch.float32)
    if init.kind == "zeros" or ids.numel() == 0:
        return out
    key = name_key(table) ^ mix64_int(seed) ^ _SALT_INIT
    stream = mix64(ids.to(torch.int64).flatten() ^ key)
    draws = 2 * dim if init.kind == "normal" else dim
    counters = torch.arange(draws, dtype=torch.int64) * GOLDEN_GAMMA
    chunk = max(1, _INIT_CHUNK // draws)  # bounds the int64/float64 temporaries
    # The draws in place in two reused buffers, the same values as mix64 and shr_logical: 1.3x
    # (normal) to 1.7x (uniform) faster than fresh tensors per op, measured at dim 16.
    bits = torch.empty((min(chunk, ids.numel()), draws), dtype=torch.int64)
    scratch = torch.empty_like(bits)
    for lo in range(0, ids.numel(), chunk):
        n = min(chunk, ids.numel() - lo)
        z, t = bits[:n], scratch[:n]
        torch.add(stream[lo : lo + n, None], counters[None, :], out=z)
        _mix64_inplace(z, t)
        z.bitwise_right_shift_(11).bitwise_and_((1 << 53) - 1)  # shr_logical(z, 11)
        u = z.to(torch.float64).mul_(2.0 ** -53)
        if init.kind == "uniform":
            values = u.mul_(init.b - init.a).add_(init.a)
        else:
            radius = torch.log1p(u[:, 0::2].neg()).mul_(-2.0).sqrt_()
            values = radius.mul_(init.b).mul_(u[:, 1::2].mul_(2.0 * math.pi).cos_()).add_(init.a)
        out[lo : lo + n] = values
    return out


def _mix64_inplace(z: torch.Tensor, t: torch.Tensor) -> None:
    """z = mix64(z), in place, with `t` (same shape) as scratch."""
    z.add_(GOLDEN_GAMMA)
    for shift, mul in ((30, _MUL1), (27, _MUL2)):
        torch.bitwise_right_shift(z, shift, out=t).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t).mul_(mul)
    torch.bitwise_right_shift(z, 31, out=t).bitwise_and_((1 << 33) - 1)
    z.bitwise_xor_(t)


# -- server-initialised fixed tables: initial rows ----------------------------------------

INIT_BLOCK_ROWS = 1 << 16  # rows per block of init_fixed_rows (~4 MiB of fp32 rows at dim 16)


def init_fixed_rows(seed: int, table: str, num_embeddings: int, dim: int, init: RowInit, *,
                    padding_idx: int | None = None, layout: FixedLayout | None = None,
                    server: int = 0, block_rows: int = INIT_BLOCK_ROWS) -> torch.Tensor:
    """The initial rows of a server-initialised fixed table: row `id` is
    init_rows(seed, table, [id], dim, init), and zeros for `padding_idx` (as torch zeroes the
    padding row). Without `layout`: all N rows in id order (one process); with it: server
    `server`'s rows in slot order (what that server holds). The same values either way,
    whatever the number of servers.

    Built block by block into the result, so the only temporaries are one block's.
    """
    if layout is not None:
        n = layout.rows_on(server)
    else:
        n = num_embeddings
    out = torch.empty((n, dim), dtype=torch.float32)
    for start in range(0, n, block_rows):
        end = min(n, start + block_rows)
        ids = (layout.ids_on(server, start, end) if layout is not None
               else torch.arange(start, end, dtype=torch.int64))
        out[start:end] = init_rows(seed, table, ids, dim, init)
    if padding_idx is not None:
        if layout is None:
            out[padding_idx] = 0.0
        else:
            where, slot = layout.place(torch.tensor([padding_idx]))
            if int(where[0]) == server:
                out[int(slot[0])] = 0.0
    return out


# -- well-formed batches ----------------------------------------------------------------------


def check_ids(table: str, ids: torch.Tensor, num_embeddings: int | None = None, *,
              unique_sorted: bool = False) -> None:
    """Raises unless `ids` are a 1-D integer tensor fit for `table`.

    Fixed tables (`num_embeddings` given): every id in [0, N), else TableIdError naming the
    first offending id. `unique_sorted`: strictly increasing (the form of every pull and push
    on the wire), else TableRowsError.
    """
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 1:
        raise TableRowsError(f"table {table!r}: ids must be a 1-D int64 tensor, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
    if ids.numel() == 0:
        return
    if num_embeddings is not None:
        bad = ((ids < 0) | (ids >= num_embeddings)).nonzero()
        if bad.numel():
            raise TableIdError(table, int(ids[bad[0, 0]]), f"is out of range [0, {num_embeddings})")
    if unique_sorted and ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise TableRowsError(f"table {table!r}: ids must be strictly increasing (unique, sorted)")


def check_rows(table: str, ids: torch.Tensor, rows: torch.Tensor, dim: int) -> None:
    """Raises TableRowsError unless `rows` are finite fp32 [len(ids), dim]."""
    if rows.dtype != torch.float32 or rows.dim() != 2 or rows.shape != (ids.numel(), dim):
        raise TableRowsError(f"table {table!r}: rows must be fp32[{ids.numel()}, {dim}], got "
                             f"{rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and not bool(torch.isfinite(rows).all()):
        raise TableRowsError(f"table {table!r}: rows have non-finite values")
