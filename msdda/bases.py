"""Named local bases: short names (``world``, ``world-lv``, ``world-flow``) that stand for a pipeline folder msdda
ships or builds, accepted wherever a base model's folder or Hub id goes.

A module that ships a base registers its name here (msdda.world registers the embedded worlds when it is imported);
the loaders only ask this registry, so they import nothing of the module that ships it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["register_local_base", "resolve_base", "local_base_names"]

_LOCAL_BASES: dict[str, Callable[[], Path]] = {}


def register_local_base(name: str, locate: Callable[[], Path]) -> None:
    """Make ``name`` stand for the folder ``locate()`` returns (called on each use, so a base built on first use is
    built only when asked for)."""
    _LOCAL_BASES[name] = locate


def resolve_base(base: str) -> str:
    """A local folder or Hub id for ``base``: a registered name's folder, else ``base`` itself."""
    locate = _LOCAL_BASES.get(base)
    return base if locate is None else str(locate())


def local_base_names() -> list[str]:
    """The registered names, in the order they were registered."""
    return list(_LOCAL_BASES)
