"""The order of a file-backed dataset: which worker reads which file in an epoch, and in what order.

Pure functions of (file names, live ranks, epoch, seed), written so that one process can
replay a job's order without running it (`docs/data.md`, "Order"). Files are keyed by their
base name, so the same dataset at another path gets the same order.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Sequence


def _key(seed: int, epoch: int, *parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in (seed, epoch, *parts)).encode()).hexdigest()


def list_files(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], suffix: str = ".npy") -> list[str]:
    """The shard files a dataset names: a directory's `*<suffix>` files, a glob's matches, or a list.

    Directories and globs are sorted by name; a list is kept as given. ValueError if no file
    is named, naming the source.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if os.path.isdir(text):
            files = sorted(os.path.join(text, n) for n in os.listdir(text) if n.endswith(suffix))
        elif glob.has_magic(text):
            files = sorted(glob.glob(text))
        else:
            files = [text]
    else:
        files = [os.fspath(f) for f in source]
    if not files:
        raise ValueError(f"{os.fspath(source) if isinstance(source, (str, os.PathLike)) else source}: no data files")
    return files


def epoch_order(files: Iterable[str], epoch: int, seed: int) -> list[str]:
    """Files sorted by SHA-256 of "{seed}:{epoch}:{base name}" (hex), a fresh order each epoch."""
    return sorted(files, key=lambda f: (_key(seed, epoch, os.path.basename(f)), os.path.basename(f)))


def assign_files(files: Sequence[str], workers: Iterable[int], epoch: int, seed: int) -> dict[int, list[str]]:
    """Each live rank's files for one epoch, in the order it reads them.

    The i-th file of `epoch_order` goes to the (i mod n)-th of the n live ranks sorted
    ascending: every file to exactly one rank, counts differing by at most one. `workers` is
    the set of live ranks (`range(n)` for a fixed job); a rank that joins or leaves changes
    the next call's answer, for the whole epoch. Every live rank is a key, possibly with [].
    ValueError on no live ranks, a negative rank or two files with the same base name.
    """
    ranks = sorted(set(workers))
    if not ranks:
        raise ValueError("assign_files needs at least one live rank")
    if ranks[0] < 0:
        raise ValueError(f"ranks must be >= 0, got {ranks[0]}")
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"data files must have distinct base names (they key the order), repeated: {twice}")
    assignment: dict[int, list[str]] = {r: [] for r in ranks}
    for i, f in enumerate(epoch_order(files, epoch, seed)):
        assignment[ranks[i % len(ranks)]].append(f)
    return assignment


def block_order(name: str, rows: int, batch_size: int, epoch: int, seed: int, shuffle: bool) -> list[tuple[int, int]]:
    """The (start, count) row ranges in which a file is read.

    Block j is rows [j * batch_size, min((j + 1) * batch_size, rows)). Unshuffled, blocks come
    in file order; shuffled, sorted by SHA-256 of "{seed}:{epoch}:{base name}:{j}" (hex).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    blocks = list(range((rows + batch_size - 1) // batch_size))
    if shuffle:
        base = os.path.basename(name)
        blocks.sort(key=lambda j: _key(seed, epoch, base, j))
    return [(j * batch_size, min(batch_size, rows - j * batch_size)) for j in blocks]
