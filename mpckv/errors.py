"""Exception types raised by mpckv.

Every user-facing error derives from :class:`MpckvError` so that the CLI can turn it into a one-line
message with exit code 2 instead of a traceback.
"""

from __future__ import annotations


class MpckvError(Exception):
    """Base class of every error mpckv raises on purpose."""


class ConfigError(MpckvError, ValueError):
    """A configuration value is out of range or inconsistent."""


class BudgetError(ConfigError):
    """A KV budget is malformed or out of range."""


class UnknownMethodError(MpckvError, KeyError):
    """A method name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else "unknown method"


class CheckpointError(MpckvError, OSError):
    """A checkpoint directory is missing, malformed or of an unsupported architecture."""


class ShapeError(MpckvError, ValueError):
    """A tensor has the wrong shape or dtype for the operation."""
