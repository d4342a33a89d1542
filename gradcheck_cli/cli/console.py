"""What the commands show on the terminal beside the report: the spinner while working, the ``--profile`` line."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console


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
