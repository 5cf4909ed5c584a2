"""Identifiers that may become file names: the one rule every daemon checks them against.

One rule for every identifier a daemon receives and may turn into a path or a log line: job
names (the spec's `name`), job ids, node ids (servers and workers) and the job id a resume
names. An identifier is 1 to `MAX_LEN` ASCII letters, digits, '.', '_' and '-', starting with
a letter or a digit, matched in full (no trailing newline slips through). So it holds no path
separator, no NUL, no whitespace or control character, and is never '.', '..' or a hidden
name (a checkpoint directory's `.tmp-*` entries cannot be named by one). Job names are at
most `MAX_JOB_NAME` characters, so that a job id (name + '-' + 6 hex digits) is an
identifier too.

The second line of defence, paths resolved and checked to lie under their root before they
are used, is the servers' (server/ps/paths.py).

Messages about a bad identifier quote at most `SHOWN` characters of it, escaped (`shown`): a
caller's bytes are never echoed unbounded, into a reply or a log line. As a second line, the
parameter server cuts every error message it sends to `MAX_ERROR` characters (`cut`).
"""

from __future__ import annotations

import re
from typing import TypeGuard

MAX_LEN = 128
MAX_JOB_NAME = 63
SHOWN = 40
MAX_ERROR = 1024  # characters of an error message a server sends (gRPC clients take 16 KiB)
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
RULE = "1-{n} letters, digits, '.', '_' or '-' (ASCII), starting with a letter or digit"


class InvalidName(ValueError):
    """An identifier that breaks the rule; the message quotes at most SHOWN characters."""


def is_valid(value: object, max_len: int = MAX_LEN) -> TypeGuard[str]:
    """Whether `value` is a str that is a valid identifier of at most `max_len` characters."""
    return (isinstance(value, str) and 0 < len(value) <= max_len
            and _ID.fullmatch(value) is not None)


def check(value: object, what: str, max_len: int = MAX_LEN) -> str:
    """Returns `value` if it is a valid identifier, else raises InvalidName naming `what`."""
    if not is_valid(value, max_len):
        raise InvalidName(f"{what}: must be {RULE.format(n=max_len)}; got {shown(value)}")
    return value


def cut(text: str, limit: int = MAX_ERROR) -> str:
    """`text`, cut to `limit` characters (the last three "...") if longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object) -> str:
    """`value` for a message: at most SHOWN characters, escaped to printable ASCII, with the
    full length when it was cut."""
    if not isinstance(value, str):
        return f"a {type(value).__name__}"
    if len(value) <= SHOWN:
        return ascii(value)
    return f"{ascii(value[:SHOWN])}... ({len(value)} characters)"
