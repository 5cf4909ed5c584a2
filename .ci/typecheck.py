"""Type-checks the package `shardps` as one program: `python .ci/typecheck.py [FILE ...]`.

The parts live in top-level folders (proto/, runtime/, ...) that pyproject.toml's package-dir
maps to shardps.proto, shardps.runtime, ...; mypy knows no such mapping, so `mypy proto` could
not resolve a single `shardps.*` import. This script links the folders into a tree
`.mypy_cache/src/shardps/<part>` (ignored by git), puts the tree on MYPYPATH and runs
`mypy -p shardps` with the repository's config, so every import of ours is checked against
its definition. With FILEs, only those are checked, with the same path and configuration
(tests/unit/test_typecheck.py's probe; a warm cache makes that about a second).
Paths in mypy's report are rewritten back to the repository's (`proto/spec.py`, not the
link). Exits with mypy's status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / ".mypy_cache" / "src"
NOT_PARTS = {"tests", "bench"}  # top-level packages that are not part of shardps


def parts(root: Path = ROOT) -> list[str]:
    """The top-level folders that are parts of the package (those with an __init__.py)."""
    return sorted(p.parent.name for p in root.glob("*/__init__.py") if p.parent.name not in NOT_PARTS)


def link_tree(root: Path = ROOT, tree: Path = TREE) -> Path:
    """Makes `tree/shardps/<part>` a link to `root/<part>` for every part; returns `tree`."""
    package = tree / "shardps"
    package.mkdir(parents=True, exist_ok=True)
    wanted = set(parts(root))
    for entry in package.iterdir():
        if entry.name not in wanted:  # a part that was renamed or removed
            entry.unlink()
    for part in wanted:
        link = package / part
        target = os.path.relpath(root / part, package)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return tree


def main(argv: list[str]) -> int:
    tree = link_tree()
    env = dict(os.environ, MYPYPATH=str(tree))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           *(argv or ["-p", "shardps"])]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    linked = os.path.relpath(tree / "shardps", ROOT) + os.sep
    for stream, text in ((sys.stdout, run.stdout), (sys.stderr, run.stderr)):
        stream.write(text.replace(linked, ""))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
