"""What the commands show on the terminal beside the report: the spinner while working, the ``--profile`` line."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from gradcheck_cli.report.report import Report


def report_console() -> Console:
    """The console a report prints on standard output: the terminal's width, or, piped, the width of the text
    report written to a file (``$COLUMNS`` wins either way, as rich reads it)."""
    from gradcheck_cli.render.text import TEXT_WIDTH

    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS", "").isdigit()
    return Console(highlight=False, soft_wrap=False, width=TEXT_WIDTH if piped else None)


def status(message: str) -> AbstractContextManager[Any]:
    """A spinner on stderr while the model loads and runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return nullcontext()
    return Console(stderr=True).status(message)


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and the CLI's own import), 0 where unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def print_profile(spent: Mapping[str, float]) -> None:
    """``--profile``: the seconds of every phase, and their sum, on one stderr line."""
    total = sum(spent.values())
    split = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in spent.items())
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"profile: {split}; {total:.2f} s in all", markup=False)


def baseline_written(report: Report, path: Path) -> None:
    """``--write-baseline``: one stderr line saying where the baseline went and what that means for the exit code."""
    n = len(report.findings)
    if report.baseline is not None:  # --baseline too: the gate judged the comparison with the old one
        tail = f"this run's exit code judges it against the baseline {report.baseline.baseline}"
    else:
        held = "no finding" if n == 0 else f"{n} finding{'' if n == 1 else 's'}"
        tail = f"{held} accepted as they are (exit 0); runs with --baseline {path} fail only on what is new or worse"
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"gradcheck: baseline written to {path}; {tail}", markup=False
    )
