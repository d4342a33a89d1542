"""A text chart of per-layer values on a log scale: one column per layer, one row per decade band."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MARKS = ("●", "×", "+", "o")


def log_chart(
    series: Mapping[str, Sequence[float]], *, height: int = 12, width: int = 64, x_label: str = "layer"
) -> str:
    """Plot each series (values > 0 on a log axis) against its index 1…n; zeros sit on the floor.

    Columns are layers, thinned to ``width`` by taking every k-th; rows span the decades the data
    covers. Each series gets its own mark; where marks collide the first series wins.
    """
    finite = [v for values in series.values() for v in values if v > 0 and math.isfinite(v)]
    n = max((len(values) for values in series.values()), default=0)
    if not finite or n == 0:
        return "(nothing to plot: every value is zero or not finite)"
    top = math.ceil(math.log10(max(finite)) + 1e-9)
    bottom = math.floor(math.log10(min(finite)) - 1e-9)
    if top == bottom:
        top += 1
    step = max(1, math.ceil(n / width))
    columns = list(range(0, n, step))
    grid = [[" "] * len(columns) for _ in range(height)]
    for mark, values in zip(MARKS, series.values(), strict=False):
        for col, index in enumerate(columns):
            if index >= len(values):
                continue
            row = _row(values[index], bottom, top, height)
            if grid[row][col] == " ":
                grid[row][col] = mark
    lines = []
    for row in range(height):
        decade = top - (top - bottom) * row / (height - 1)
        label = f"1e{round(decade):+d}" if row in (0, height - 1) or row == height // 2 else ""
        lines.append(f"{label:>6} │{''.join(grid[row])}")
    lines.append(f"{'':>6} └{'─' * len(columns)}")
    ends = "1" + " " * max(1, len(columns) - 1 - len(str(n))) + str(n)
    lines.append(f"{'':>8}{ends}")
    lines.append(f"{'':>8}{x_label.center(len(columns))}")
    legend = "   ".join(f"{mark} {name}" for mark, name in zip(MARKS, series, strict=False))
    lines.append(f"{'':>8}{legend}")
    return "\n".join(lines)


def _row(value: float, bottom: int, top: int, height: int) -> int:
    if value <= 0 or math.isnan(value):
        return height - 1
    if math.isinf(value):
        return 0
    position = (math.log10(value) - bottom) / (top - bottom)
    return min(height - 1, max(0, round((1.0 - position) * (height - 1))))
