"""Checks on what a caller sent the coordinator, and how a refused call ends: the core's
exceptions mapped to status codes, with messages cut to a bounded length."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NoReturn

import grpc

from shardps.proto.names import cut
from shardps.proto.spec import SpecError

from .job import JobStateError, UnknownJobError
from .membership import StaleNodeError, UnknownNodeError

# Text a node may send that every ListNodes / ListJobs reply carries on (addresses, host and
# device names, a worker's failure message): bounded, so that no caller can make those
# replies too big for anyone to receive. Error messages are cut to MAX_ERROR characters.
MAX_NODE_TEXT = 1024
MAX_FAILURE_TEXT = 2048
MAX_ERROR = 1024


@contextlib.contextmanager
def refusals(context: grpc.ServicerContext, on_spec_error: Callable[[], None]) -> Iterator[None]:
    """Turns the core's exceptions into aborts: INVALID_ARGUMENT for a bad spec (after
    `on_spec_error()`) or bad input, NOT_FOUND for an unknown job or node,
    FAILED_PRECONDITION for a call the job's state or the caller's role does not allow."""
    try:
        yield
    except SpecError as exc:
        on_spec_error()
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except ValueError as exc:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except (UnknownJobError, UnknownNodeError) as exc:
        abort(context, grpc.StatusCode.NOT_FOUND, exc.args[0])
    except (JobStateError, StaleNodeError) as exc:
        abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """Ends the call with `code`; the message is cut to MAX_ERROR characters (it may echo an
    id or value the caller sent, of any length)."""
    context.abort(code, cut(message, MAX_ERROR))
    raise AssertionError("context.abort returned")


def required(value: str, name: str) -> str:
    """Raises ValueError naming the field if `value` is empty."""
    if not value:
        raise ValueError(f"{name} is required")
    return value


def wait_ms(value: int, name: str) -> int:
    """Raises ValueError naming the field if a wait is negative."""
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def node_text(request: object, fields: tuple[str, ...]) -> None:
    """Raises ValueError naming the first of `fields` longer than MAX_NODE_TEXT."""
    for name in fields:
        length = len(getattr(request, name))
        if length > MAX_NODE_TEXT:
            raise ValueError(f"{name}: at most {MAX_NODE_TEXT} characters, got {length}")
