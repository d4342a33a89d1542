"""Exit codes of the ``gradcheck`` command; their meaning never changes."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a ``gradcheck`` process tells its caller (a CI job, a shell script)."""

    OK = 0
    """It ran, and nothing at or above ``--fail-on`` was found."""
    PROBLEMS = 1
    """It ran, and problems were found: the CI gate fails."""
    UNUSABLE_INPUT = 2
    """It could not run: bad flags, an unreadable or refused checkpoint, a batch that does not fit."""
    INTERNAL_ERROR = 3
    """A gradcheck bug: a traceback was printed with a request to report it."""
