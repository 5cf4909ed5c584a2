"""Resolves a user's `package.module:factory` import path (models and datasets) to a callable."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_factory(path: str) -> Callable[..., Any]:
    """Imports `package.module` and returns its attribute `factory`.

    Raises ValueError with the path in the message if the module or attribute is missing or
    the attribute is not callable, so a job fails with a reason a user can act on.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
    if not callable(factory):
        raise ValueError(f"{path!r} is not callable")
    return factory
