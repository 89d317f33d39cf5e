"""The one error type for bad input: every ``msdda`` command prints it as one line, without a traceback.

Raise :class:`UserError` where the input (a config value, a path, a weight, an adapter) is wrong and the
message names the bad value and the fix. Anything else is a bug and keeps its traceback. UserError is a
ValueError, and :class:`InputNotFound` also a FileNotFoundError, so library callers can catch either.
"""

from __future__ import annotations

__all__ = ["UserError", "InputNotFound"]


class UserError(ValueError):
    """Bad input, named by the message together with the fix."""


class InputNotFound(UserError, FileNotFoundError):
    """A file, folder, model or adapter the input names does not exist (or cannot be fetched)."""
