"""Tables, JSON results and a description of the machine, shared by every bench script."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"


def parser(doc: str, small: str) -> argparse.ArgumentParser:
    """A bench's command line: `doc` (its module docstring) as the help, plus `--small`
    (`small` says what that run is) and `--out-dir`."""
    out = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    out.add_argument("--small", action="store_true", help=f"a seconds-long run for CI ({small})")
    out.add_argument("--out-dir", default=None, help="where to write the JSON (default bench/out)")
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def parse_count(text: str) -> int:
    """'10M' -> 10_000_000, '1.5G' -> 1_500_000_000, '4096' -> 4096, '256K' -> 256_000."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_bytes(text: str) -> int:
    """'2MiB' / '2M' -> 2 * 2**20, '256K' -> 256 * 2**10, '4096' -> 4096."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{n:g}"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import grpc
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent, timeout=10).stdout.strip()
        info["git"] = rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Table:
    """Rows of dicts printed as aligned columns."""

    def __init__(self, title: str, columns: Sequence[str]):
        self.title = title
        self.columns = list(columns)
        self.rows: list[dict[str, Any]] = []

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def render(self) -> str:
        cells = [[_fmt(row.get(c, "")) for c in self.columns] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]
        lines = [self.title,
                 "  ".join(c.rjust(w) for c, w in zip(self.columns, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in self.columns) + " |"
                  for row in self.rows]
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write(name: str, tables: Sequence[Table], config: dict[str, Any], extra: dict[str, Any] | None = None,
          out_dir: Path | None = None, module: str = "") -> Path:
    """Prints the tables and writes bench/out/NAME.json (NAME's bench is bench.MODULE, default
    NAME); returns the JSON path."""
    for table in tables:
        print()
        print(table.render())
    out = Path(out_dir or OUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    payload = {
        "bench": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{module or name}", *sys.argv[1:]]),
        "machine": machine(),
        "config": config,
        "tables": {t.title: t.rows for t in tables},
        "markdown": {t.title: t.markdown() for t in tables},
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path
