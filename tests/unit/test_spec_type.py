"""The normalised spec's type (spec.JobSpec) says what parse_spec returns: the SCHEMA's keys,
section by section, with the types of their values. mypy checks code against the type only,
so these tests hold the type to the schema."""

import types
import typing
from pathlib import Path

import typing_extensions

from shardps.proto import spec

ROOT = Path(__file__).resolve().parents[2]
FULL = """\
name: full
model: {name: mlp, kwargs: {hidden: [8]}}
data: {dataset: digits, kwargs: {noise: 0.1}}
stop: {max_steps: 100, target: {metric: accuracy, value: 0.9}}
"""


def _alternatives(hint):
    """The types a hint allows (X | None -> [X, NoneType])."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def _keys_of_type(td) -> dict:
    out = {}
    for key, hint in typing_extensions.get_type_hints(td).items():
        nested = [h for h in _alternatives(hint) if typing_extensions.is_typeddict(h)]
        out[key] = _keys_of_type(nested[0]) if nested else None
    return out


def _keys_of_schema(schema: dict) -> dict:
    return {key: _keys_of_schema(rule) if isinstance(rule, dict) else None
            for key, rule in schema.items()}


def test_the_type_has_the_keys_of_the_schema():
    assert _keys_of_type(spec.JobSpec) == _keys_of_schema(spec.SCHEMA)


def _check_values(value, td, path: str) -> None:
    hints = typing_extensions.get_type_hints(td)
    assert set(value) == set(hints), path
    for key, hint in hints.items():
        allowed = _alternatives(hint)
        item = value[key]
        nested = [h for h in allowed if typing_extensions.is_typeddict(h)]
        if nested and item is not None:
            _check_values(item, nested[0], f"{path}{key}.")
            continue
        classes = tuple(typing.get_origin(h) or h for h in allowed if h not in nested)
        assert isinstance(item, classes), f"{path}{key}: {item!r} is not {hint}"


def test_a_parsed_spec_has_the_types_the_type_says():
    for text in (FULL, (ROOT / "examples" / "digits.yaml").read_text()):
        _check_values(spec.parse_spec(text), spec.JobSpec, "")


def test_a_spec_without_target_has_none_there():
    parsed = spec.parse_spec("model: {name: mlp}\ndata: {dataset: digits}\nstop: {max_steps: 1}\n")
    _check_values(parsed, spec.JobSpec, "")
    assert parsed["stop"]["target"] is None
