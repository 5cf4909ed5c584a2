"""The one identifier rule (proto/names.py) and the path-under-root check (server/ps/paths.py)."""

import os

import pytest

from shardps.proto import names, spec
from shardps.server.ps import paths

GOOD = ["a", "job-1a2b3c", "digits.v2", "A_b-c.d", "worker-ff", "0", "x" * names.MAX_LEN, "a..b"]
BAD = ["", ".", "..", "../x", "../../etc", "/abs/path", "a/b", "a\\b", "job\n", "job\r", "\njob",
       "a\0b", "x" * (names.MAX_LEN + 1), ".hidden", "-flag", "_x", "a b", "jöb", "job\u2028",
       "٣", "a\tb", None, 5, b"job", ["job"]]


@pytest.mark.parametrize("value", GOOD)
def test_valid_identifiers(value):
    assert names.is_valid(value)
    assert names.check(value, "job id") == value


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_invalid_identifiers_are_refused_with_a_bounded_escaped_message(value):
    assert not names.is_valid(value)
    with pytest.raises(names.InvalidName) as info:
        names.check(value, "job id")
    message = str(info.value)
    assert message.startswith("job id: must be 1-128 letters")
    assert len(message) < 250 and message.isascii() and message.isprintable()


def test_a_long_identifier_is_quoted_only_in_part():
    message = str(pytest.raises(names.InvalidName, names.check, "y" * 100_000, "job id").value)
    assert "y" * names.SHOWN in message and "y" * (names.SHOWN + 1) not in message
    assert "100000 characters" in message


def test_job_names_leave_room_for_the_job_id_suffix():
    assert names.is_valid("n" * names.MAX_JOB_NAME, names.MAX_JOB_NAME)
    assert not names.is_valid("n" * (names.MAX_JOB_NAME + 1), names.MAX_JOB_NAME)
    assert names.is_valid("n" * names.MAX_JOB_NAME + "-abc123")


@pytest.mark.parametrize("name", ["job\n", "job\r\n", "../x", "a" * 64, "a/b", ".x"], ids=repr)
def test_the_spec_refuses_the_same_names(name):
    # 9a: `$` matched before a final newline, so "job\n" was accepted.
    with pytest.raises(spec.SpecError, match="^name: must be 1-63 letters"):
        spec.validate({"name": name, "model": {"name": "mlp"}, "data": {"dataset": "digits"},
                       "stop": {"max_steps": 1}})


def test_the_spec_refuses_an_import_path_with_a_trailing_newline():
    with pytest.raises(spec.SpecError, match="^model.name: unknown model"):
        spec.validate({"model": {"name": "pkg.mod:factory\n"}, "data": {"dataset": "digits"},
                       "stop": {"max_steps": 1}})
    assert spec.validate({"model": {"name": "pkg.mod:factory"}, "data": {"dataset": "digits"},
                          "stop": {"max_steps": 1}})["model"]["name"] == "pkg.mod:factory"


def test_under_accepts_paths_inside_the_root_and_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "jobs" / "j").mkdir(parents=True)
    assert paths.under(root, "jobs", "j", "shard-0") == (root / "jobs/j/shard-0").resolve()
    assert paths.under(root) == root.resolve()
    for parts in [("..",), ("jobs", "..", ".."), ("/etc",), ("jobs", "/etc/passwd"),
                  ("..", "root-other")]:
        with pytest.raises(paths.PathEscape):
            paths.under(root, *parts)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "jobs" / "link")
    with pytest.raises(paths.PathEscape):
        paths.under(root, "jobs", "link", "shard-0")
    os.symlink(root / "jobs" / "j", root / "jobs" / "inner")  # a symlink that stays inside
    assert paths.under(root, "jobs", "inner") == (root / "jobs" / "j").resolve()
    with pytest.raises(ValueError):
        paths.under(root, "a\0b")


def test_under_follows_a_symlinked_root(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "data")
    assert paths.under(tmp_path / "data", "jobs") == (tmp_path / "real" / "jobs")
