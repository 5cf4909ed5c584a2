"""Regenerates the committed protobuf/gRPC code from the .proto files under shardps/v1/.

The .proto files sit at the path their imports name (`shardps/v1/common.proto`, the package's
own path), so any protoc or loader reads them from the repository as it is with `proto/` as
the include root. protoc names the Python modules after that path (`shardps.v1.common_pb2`);
the generated code lives in this package instead, so its imports are rewritten to
`shardps.proto`.

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
PACKAGE_PATH = "shardps/v1"  # where the .proto files sit under PROTO_DIR, as they import each other
SOURCES = ("common.proto", "coordinator.proto", "ps.proto")
GENERATED_IMPORT = "from shardps.v1 import "
PACKAGE_IMPORT = "from shardps.proto import "


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc into out_dir and returns the generated files."""
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(f"{PROTO_DIR / PACKAGE_PATH / name}" for name in SOURCES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    generated = sorted((out_dir / PACKAGE_PATH).iterdir())
    for path in generated:
        path.write_text(path.read_text().replace(GENERATED_IMPORT, PACKAGE_IMPORT))
    return generated


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
