"""Where the time of one run goes (``--profile``): phases timed only while a recording is active."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

_current: ContextVar[dict[str, float] | None] = ContextVar("gradcheck_timing", default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Collect the seconds of every :func:`phase` inside the block, by phase name, in first-seen order."""
    phases: dict[str, float] = {}
    token = _current.set(phases)
    try:
        yield phases
    finally:
        _current.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time to ``name`` when a recording is active; nothing otherwise."""
    phases = _current.get()
    if phases is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
