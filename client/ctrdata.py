"""`shardps data ctr OUT --rows N --files K` (or `python -m shardps.client.ctrdata ctr ...`):
write a synthetic click log.

The log has Criteo's layout (label, 13 integer and 26 categorical features) in K record files
(`shardps.proto.records`) plus `manifest.json`, streamed one generation block at a time, so
memory does not grow with N. It prints the Bayes AUC: the AUC of the true click probabilities
on the generated rows, which bounds from above what any model trained on the log can reach.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardps.client import ctrmodel
from shardps.proto import exitcodes, records

MANIFEST = records.MANIFEST
FORMAT = records.MANIFEST_FORMAT
AUC_BINS = 1 << 20


class HistogramAuc:
    """AUC of streamed (probability, label) pairs from a fixed histogram: O(bins) memory.

    Pairs whose probabilities share a bin count one half, as ties; `error_bound()` is the most
    that can differ from the exact AUC (half of the same-bin pairs' share).
    """

    def __init__(self, bins: int = AUC_BINS):
        self.bins = bins
        self.positives = np.zeros(bins, dtype=np.int64)
        self.negatives = np.zeros(bins, dtype=np.int64)

    def add(self, probability: np.ndarray, label: np.ndarray) -> None:
        index = np.minimum((probability * self.bins).astype(np.int64), self.bins - 1)
        self.positives += np.bincount(index[label], minlength=self.bins)
        self.negatives += np.bincount(index[~label], minlength=self.bins)

    def _pairs(self) -> float:
        pairs = float(self.positives.sum()) * float(self.negatives.sum())
        if pairs == 0:
            raise ValueError("AUC needs both classes")
        return pairs

    def auc(self) -> float:
        negatives_below = np.cumsum(self.negatives) - self.negatives
        wins = self.positives.astype(np.float64) @ (negatives_below + self.negatives / 2.0)
        return float(wins / self._pairs())

    def error_bound(self) -> float:
        return float(self.positives.astype(np.float64) @ self.negatives / 2.0 / self._pairs())


@dataclass(frozen=True)
class CtrSummary:
    """What `write_ctr` wrote, as recorded in the manifest."""

    rows: int
    files: list[str]
    nbytes: int
    bayes_auc: float | None  # None when every label came out the same (a tiny log)
    bayes_auc_error_bound: float | None
    positive_rate: float


def file_rows(rows: int, files: int) -> list[int]:
    """Rows per file: file i holds global rows [i * rows // files, (i + 1) * rows // files)."""
    return [(i + 1) * rows // files - i * rows // files for i in range(files)]


def _check_out(out: Path, rows: int, files: int) -> None:
    if rows < 1 or files < 1:
        raise ValueError(f"--rows and --files must be >= 1, got {rows} and {files}")
    if files > rows:
        raise ValueError(f"--files {files} is more than --rows {rows}: every file needs a row")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory")


def write_ctr(out: Path, rows: int, files: int, seed: int) -> CtrSummary:
    """Writes the log to `out` (a new or empty directory); ValueError on bad arguments.

    Rows come from generation blocks in order (ctrmodel.draw_block), so the rows, in file
    order, depend on (seed, rows) only, not on the number of files.
    """
    _check_out(out, rows, files)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"part-{i:05d}.npy" for i in range(files)]
    sizes = file_rows(rows, files)
    histogram = HistogramAuc()
    positives = _write_rows(out, names, sizes, seed, histogram)
    both_classes = 0 < positives < rows
    summary = CtrSummary(rows, names, sum((out / n).stat().st_size for n in names),
                         histogram.auc() if both_classes else None,
                         histogram.error_bound() if both_classes else None, positives / rows)
    _write_manifest(out, seed, summary, sizes)
    return summary


def _write_rows(out: Path, names: list[str], sizes: list[int], seed: int, histogram: HistogramAuc) -> int:
    """Draws the blocks in order into the files; returns the positives.

    A failure leaves no partial shard (the open file's `.tmp` is removed) and no manifest.
    """
    rows = sum(sizes)
    writers = iter(records.RecordFileWriter(out / n, records.CTR_RECORD, r) for n, r in zip(names, sizes, strict=True))
    writer = next(writers)
    positives = 0
    try:
        for index in range((rows + ctrmodel.BLOCK_ROWS - 1) // ctrmodel.BLOCK_ROWS):
            block = ctrmodel.draw_block(seed, index, min(ctrmodel.BLOCK_ROWS, rows - index * ctrmodel.BLOCK_ROWS))
            label = block.records["label"].astype(bool)
            histogram.add(block.probability, label)
            positives += int(label.sum())
            pending = block.records
            while len(pending):
                if writer.written == writer.rows:
                    writer.close()
                    writer = next(writers)
                take = min(len(pending), writer.rows - writer.written)
                writer.write(pending[:take])
                pending = pending[take:]
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return positives


def _write_manifest(out: Path, seed: int, summary: CtrSummary, sizes: list[int]) -> None:
    manifest = {
        "format": FORMAT,
        "dataset": "ctr",
        "schema": records.describe(records.CTR_RECORD),
        "rows": summary.rows,
        "files": [{"name": n, "rows": r} for n, r in zip(summary.files, sizes, strict=True)],
        "seed": seed,
        "bayes_auc": summary.bayes_auc,
        "bayes_auc_error_bound": summary.bayes_auc_error_bound,
        "positive_rate": summary.positive_rate,
        "hidden_model": ctrmodel.description(),
        "numpy": np.__version__,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)


def main(argv: list[str] | None = None) -> int:
    """`python -m shardps.client.ctrdata ctr ...`, the same as `shardps data ctr ...`."""
    from shardps.client import cli  # the command's arguments live with the CLI's (no numpy there)

    return cli.main(["data", *(sys.argv[1:] if argv is None else argv)])


def run(args: argparse.Namespace) -> int:
    """Writes the log `args` describe and prints what it holds; an exit code."""
    try:
        s = write_ctr(args.out, args.rows, args.files, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    print(f"wrote {s.rows} rows in {len(s.files)} files ({s.nbytes / 2**20:.1f} MiB) to {args.out}")
    print(f"positive rate {s.positive_rate:.4f}")
    if s.bayes_auc is None or s.bayes_auc_error_bound is None:
        print("Bayes AUC undefined: every label is the same")
    else:
        print(f"Bayes AUC {s.bayes_auc:.5f} (+/- {s.bayes_auc_error_bound:.1e}): no model can expect more on this log")
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
