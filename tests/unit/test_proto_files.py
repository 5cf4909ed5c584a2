"""The .proto files load with a plain protoc from the repository as it is, as a user in
another language would build them."""

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_protoc_builds_the_checked_in_tree_with_proto_as_include_root(tmp_path):
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto" / "shardps" / "v1").glob("*.proto"))
    assert len(sources) == 3
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--descriptor_set_out={tmp_path / 'set.pb'}",
         "--include_imports", *sources],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes()).file
    services = {s.name for f in files for s in f.service}
    assert services == {"Coordinator", "ParameterServer"}
    assert {f.package for f in files} == {"shardps.v1"}
    assert (tmp_path / "shardps" / "v1" / "ps_pb2_grpc.py").exists()


def test_every_document_a_proto_file_names_is_in_the_repository():
    named = {(path.name, doc) for path in (ROOT / "proto").rglob("*.proto")
             for doc in re.findall(r"[\w./-]+\.md\b", path.read_text())}
    assert named, "the .proto comments point readers at docs/architecture.md"
    missing = [(proto, doc) for proto, doc in named if not (ROOT / doc).is_file()]
    assert not missing
