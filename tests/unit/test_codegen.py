"""The committed generated code is exactly what the .proto files generate."""

from shardps.proto import codegen


def test_regenerating_changes_nothing():
    assert codegen.main(["--check"]) == 0
