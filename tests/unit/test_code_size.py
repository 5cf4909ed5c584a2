"""The size rules of docs/layout.md: no class over 250 lines and no function over 60, outside
generated code, so that a new concern gets a module of its own instead of growing a class."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARTS = ("proto", "runtime", "psclient", "server", "worker", "client", "bench", "tests", "deploy")
MAX_CLASS, MAX_FUNCTION = 250, 60


def _sources() -> list[pathlib.Path]:
    return [p for part in PARTS for p in sorted((ROOT / part).rglob("*.py"))
            if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def test_no_class_or_function_over_the_limits():
    sources = _sources()
    assert len(sources) > 100  # the scan sees the code (a wrong root would pass vacuously)
    over = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0)
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS:
                over.append(f"{path.relative_to(ROOT)}: class {node.name} {lines} lines")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION:
                over.append(f"{path.relative_to(ROOT)}: {node.name} {lines} lines")
    assert not over, "\n".join(over)
