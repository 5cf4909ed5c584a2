"""The top-level parts meet only through the contract and the shared runtime.

proto/ (the wire contract) imports nothing of ours but itself; runtime/ (process plumbing)
the contract; psclient/ (the PS client library) the contract and the runtime; server/,
worker/ and client/ each the contract, the runtime and the PS client library (servers to
forward pushes to backups), and none of the three another. docs/layout.md states the same rules.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "proto": {"proto"},
    "runtime": {"proto", "runtime"},
    "psclient": {"proto", "runtime", "psclient"},
    "server": {"proto", "runtime", "psclient", "server"},  # a primary forwards to its backups
    "worker": {"proto", "runtime", "psclient", "worker"},
    "client": {"proto", "runtime", "psclient", "client"},
}


def _imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "shardps" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def test_each_part_imports_only_what_it_may():
    broken = []
    for part, allowed in ALLOWED.items():
        for path in sorted((ROOT / part).rglob("*.py")):
            if extra := _imported_parts(path) - allowed:
                broken.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not broken, "\n".join(broken)


def test_every_package_of_ours_is_covered_by_the_rules():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(ALLOWED)
