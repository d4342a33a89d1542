"""The chart engine: matplotlib figures, built without pyplot and rendered to PNG, SVG or PDF bytes.

matplotlib is imported here only, inside the functions, so that commands without a chart start fast.
Figures are ``matplotlib.figure.Figure`` objects on a non-interactive canvas: no global figure registry,
no GUI backend, nothing left open. While a chart is drawn, matplotlib's defaults replace the user's
matplotlibrc (the picture's size and look do not depend on it), and the output is deterministic: a
fixed SVG hash salt, no dates, SVG text kept as text.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
"""A picture's file suffix → the format matplotlib writes."""
DPI = 100
SIDE_WIDTH = 3.1
"""Inches of the right-hand column: legend and notes, never on top of the data."""

_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "svg": {"Date": None, "Creator": None, "Format": None, "Type": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
}


def checked_format(fmt: str) -> str:
    """``fmt`` when matplotlib draws it here (png, svg, pdf); anything else is a one-line error."""
    if fmt not in FORMATS.values():
        raise GradcheckError(f"picture format {fmt!r}: choose png, svg or pdf")
    return fmt


@contextmanager
def _drawing_style() -> Iterator[None]:
    import matplotlib
    import matplotlib.style

    with (
        matplotlib.style.context("default"),
        matplotlib.rc_context(
            {
                "svg.hashsalt": "gradcheck",  # the ids of clip paths and markers do not change between runs
                "svg.fonttype": "none",  # text stays text: searchable, and small
                "font.family": "sans-serif",
                "font.sans-serif": ["DejaVu Sans"],  # ships with matplotlib: every glyph we draw is there
            }
        ),
    ):
        yield


def render(draw: Callable[[], Figure], fmt: str) -> bytes:
    """The figure that ``draw`` builds, rendered to ``fmt`` in memory (a failed drawing writes nothing)."""
    checked_format(fmt)
    buffer = io.BytesIO()
    with _drawing_style():
        figure = draw()
        try:
            figure.savefig(buffer, format=fmt, dpi=DPI, metadata=_METADATA[fmt])
        finally:
            figure.clear()
    return buffer.getvalue()


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` × ``height`` inches on a non-interactive canvas, laid out by constraints."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # savefig switches to the SVG or PDF canvas by itself
    return figure


def panel_figure(width: float, height: float) -> tuple[Figure, Axes, Axes]:
    """A figure with one panel and the side column (legend and notes) right of it."""
    figure = new_figure(width, height)
    grid = figure.add_gridspec(1, 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH])
    return figure, figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
