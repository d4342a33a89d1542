"""What every chart shares in looks: colours, the gradient symbols, shortened names, the side column."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

GRAD_H = r"$\Vert\partial L/\partial h\Vert$"
GRAD_W = r"$\Vert\partial L/\partial W\Vert$"
GRAD_THETA = r"$\Vert\partial L/\partial\theta\Vert$"
WEIGHT = r"$\Vert W\Vert$"

BLUE = "#1f5fa8"
ORANGE = "#e08a1e"
RED = "#c8102e"
GREEN = "#2e7d32"
GREY = "#777777"
VANISH_FILL = "#f4c7c3"
EXPLODE_FILL = "#fde0b6"
STRIP_FILL = "#e6e6e6"
GRID = "#dddddd"
TEXT = "#333333"

MAX_LABEL = 34
"""Longer layer names are shortened in the middle."""


def short(label: str, limit: int = MAX_LABEL) -> str:
    """``label`` cut to ``limit`` characters in the middle (``transformer.h…mlp.c_proj``)."""
    if len(label) <= limit:
        return label
    keep = limit - 1
    return label[: keep - keep // 2] + "…" + label[-(keep // 2) :]


def side_panel(ax: Axes, handles: Sequence[Any], labels: Sequence[str], notes: Sequence[str]) -> None:
    """Legend at the top of the right-hand column, notes under it: nothing on top of the data."""
    ax.axis("off")
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8)
    if notes:
        wrapped = "\n".join(textwrap.fill(note, 44, subsequent_indent="  ") for note in notes)
        ax.text(0.0, 0.0, wrapped, transform=ax.transAxes, fontsize=7.5, va="bottom", ha="left", color=TEXT)


def legend_order(handles: Sequence[Any], labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    """Measurements first, then the fitted line, then the threshold bands."""

    def rank(label: str) -> int:
        if label.startswith(GRAD_H):
            return 0
        if label.startswith(("flagged", "exactly 0", "NaN", "no gradient")):
            return 1
        if label.startswith(("fitted", "theory", "mean-field", "crosses")):
            return 3
        if label.startswith(("vanishing", "exploding", "collapsing")):
            return 4
        return 2

    pairs = sorted(zip(handles, labels, strict=True), key=lambda pair: rank(pair[1]))
    return [h for h, _ in pairs], [label for _, label in pairs]


def integer_x(ax: Axes, ticks: int = 4) -> None:
    """At most ``ticks`` integer ticks on the x axis (four: a narrow panel still fits 4-digit steps)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=ticks, integer=True))


def y_grid(ax: Axes) -> None:
    """Faint lines at the major ticks of the y axis."""
    ax.grid(axis="y", which="major", color=GRID, lw=0.6, zorder=0.1)
