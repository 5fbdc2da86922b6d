"""The kinds of failure of the command line that no Python exception names: each has its own exit status
(:data:`fastmask.app.cli.EXIT_STATUSES`). Kept apart from ``cli.py`` so that the modules the command line runs
(``debias.py``) raise them without importing the command line."""

from __future__ import annotations

__all__ = ["UsageError", "DeviceError"]


class UsageError(ValueError):
    """Options that contradict each other or a value out of range: exit status 2, as argparse's own refusals."""


class DeviceError(RuntimeError):
    """The ``--device`` asked for is not available on this machine."""
