"""The document a machine format gets when gradcheck could not run: the status ``error``, the exit code and
the one-line message (the same line as on standard error), so a consumer can always parse what it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradcheck_cli.report.report import SCHEMA_VERSION


@dataclass(frozen=True)
class ErrorReport:
    """What ``--format json`` prints (and writes to its ``--output``) instead of a report when the run ended
    with exit 2 (unusable input: bad flags, a refused or unreadable checkpoint, a batch that does not fit) or
    exit 3 (an internal error). ``status`` is ``error``; nothing was measured."""

    code: int
    """The exit code: 2 unusable input, 3 internal error (a gradcheck bug)."""
    message: str
    """The one-line error gradcheck printed on standard error, without its ``error:`` prefix."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ``schema_version``, ``status`` (``error``), ``code``, ``message``."""
        return {"schema_version": SCHEMA_VERSION, "status": "error", "code": self.code, "message": self.message}
