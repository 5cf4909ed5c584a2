"""Regenerates the committed protobuf/gRPC code from the .proto files in this folder.

Run `python -m shardps.proto.codegen` after editing a .proto file; `--check` exits 1 if the
committed code differs from what the .proto files generate (the test suite runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
SOURCES = ("common.proto", "coordinator.proto", "ps.proto")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc into out_dir and returns the generated files."""
    args = [
        "grpc_tools.protoc",
        f"-Ishardps/proto={PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(f"shardps/proto/{name}" for name in SOURCES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "shardps" / "proto").iterdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    opts = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = [g.name for g in generated if not (PROTO_DIR / g.name).exists()
                 or not filecmp.cmp(g, PROTO_DIR / g.name, shallow=False)]
        if opts.check:
            if stale:
                print(f"generated code is out of date: {', '.join(stale)}", file=sys.stderr)
                return 1
            return 0
        for g in generated:
            shutil.copyfile(g, PROTO_DIR / g.name)
        print(f"wrote {len(generated)} files to {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
