"""Resolves a user's `package.module:factory` import path (models and datasets) to a callable."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# Module prefixes a job may import factories from; None allows any (set by the worker daemon
# from --allow-import). Importing a module runs its code on this worker, so whoever may
# submit jobs may run code here unless this list is set.
_allowed_prefixes: tuple[str, ...] | None = None


def allow_imports(prefixes: list[str] | None) -> None:
    """Restricts import paths to modules under these dotted prefixes (None: allow any)."""
    global _allowed_prefixes
    _allowed_prefixes = tuple(prefixes) if prefixes is not None else None


def is_allowed(module_name: str) -> bool:
    if _allowed_prefixes is None:
        return True
    return any(module_name == p or module_name.startswith(p + ".") for p in _allowed_prefixes)


def import_factory(path: str) -> Callable[..., object]:
    """Imports `package.module` and returns its attribute `factory`.

    Raises ValueError with the path in the message if the module is not allowed by
    --allow-import, the module or attribute is missing, or the attribute is not callable,
    so a job fails with a reason a user can act on.

    With --allow-import, the factory itself must also be defined under an allowed prefix
    (its `__module__`): an allowed module's namespace also holds what it imported, and
    `mypkg:system` after `from os import system` in mypkg would otherwise run os.system.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path 'package.module:factory'")
    if not is_allowed(module_name):
        raise ValueError(f"{module_name!r} is not allowed on this worker (--allow-import "
                         f"{' '.join(_allowed_prefixes or ())})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
    if not callable(factory):
        raise ValueError(f"{path!r} is not callable")
    if _allowed_prefixes is not None:
        defined_in = getattr(factory, "__module__", None)
        if not isinstance(defined_in, str) or not is_allowed(defined_in):
            raise ValueError(f"{path!r} is defined in module {defined_in!r}, which is not allowed "
                             f"on this worker (--allow-import {' '.join(_allowed_prefixes)}): a "
                             "factory must be defined under an allowed prefix, not imported into one")
    return factory
