"""Paths in a data dir: resolved, and checked to lie under their root before they are used.

The second line of defence after the identifier rule (proto/names.py): the servers call
`under` before they open, create or delete anything in a data dir, so neither a '..' nor an
absolute part nor a symlink pointing out leads elsewhere. (A writer racing us inside the data
dir, between the check and the use, is beyond it: see README, "Security".)
"""

from __future__ import annotations

from pathlib import Path


class PathEscape(ValueError):
    """A path that resolves outside the root it must lie under."""


def under(root: Path | str, *parts: str) -> Path:
    """`root/parts...` resolved, checked to lie under (or be) the resolved root.

    Raises PathEscape if it does not (a '..' or absolute part, or a symlink pointing out),
    ValueError for a part with a NUL byte. The message names neither path (a reply may carry
    it): the caller logs what it needs.
    """
    base = Path(root).resolve()
    for part in parts:
        if "\0" in part:
            raise ValueError("path component with a NUL byte")
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise PathEscape("path resolves outside its root")
    return path
