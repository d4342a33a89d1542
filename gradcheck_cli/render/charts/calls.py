"""The gradient through time: per call of a module that ran several times, or per time step of a fused RNN.

Each layer's values come from ``render.view.through_time`` (÷ the output end's gradient, or ÷ the last time
step's), first call left: the first call is the farthest from the loss. The thresholds are bands, as in
the per-layer panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradcheck_cli.render.charts.logaxis import Line, bands, draw_points, draw_series, is_zero, log_scale
from gradcheck_cli.render.charts.style import BLUE, GRAD_H, GREEN, GREY, ORANGE, RED, integer_x, short, y_grid
from gradcheck_cli.render.view import ThroughTime
from gradcheck_cli.report.report import Report
from gradcheck_cli.simulate.report import EXPLODING_ABOVE, VANISHING_BELOW

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAX_CALL_SERIES = 4
"""At most this many layers in one through-time panel."""
COLOURS = (BLUE, ORANGE, GREEN, "#6a3d9a", GREY, RED)


def series_label(report: Report, series: ThroughTime) -> str:
    """``rnn.cell: ‖∂L/∂h‖ per call ÷ output end``."""
    name = short(report.layers[series.index].name or "(root)", 28)
    if series.unit == "call":
        return f"{name}: {GRAD_H} per call ÷ output end"
    return f"{name}: ‖∂L/∂x_t‖ per step ÷ last step"


def thresholds(report: Report) -> tuple[float, float]:
    """The vanishing and exploding thresholds relative to the output end."""
    return (
        report.thresholds.get("vanishing_attenuation", VANISHING_BELOW),
        report.thresholds.get("exploding_attenuation", EXPLODING_ABOVE),
    )


def draw_through_time(ax: Axes, report: Report, series: Sequence[ThroughTime], points: str | None = None) -> list[str]:
    """Each series against its call (time step) 1…n; with ``points`` (one series), one artist per value
    (SVG id ``{points}-<k>``), values beyond the thresholds red. Returns the notes for the side column."""
    limits = thresholds(report)
    scale = log_scale([v for s in series for v in s.values], include=(limits[0] / 10, limits[1] * 10))
    scale.apply(ax)
    bands(ax, scale, limits, ("vanishing", "exploding"), " × output end")
    for k, (one, colour) in enumerate(zip(series, COLOURS, strict=False)):
        xs = list(range(1, len(one.values) + 1))
        marker = "o" if len(xs) <= 60 and points is None else None
        draw_series(
            ax,
            xs,
            one.values,
            scale,
            Line(series_label(report, one), colour, marker, markersize=3, gid=f"call-series-{k}"),
        )
        if points is not None:
            red = [not limits[0] <= v <= limits[1] for v in one.values]
            draw_points(ax, xs, one.values, scale, red, points)
    ax.set_xlabel("call (time step) in forward order: the first call is farthest from the loss")
    ax.set_ylabel("gradient ÷ output end (log)")
    ax.set_title("modules that ran several times: the gradient through time", loc="left", fontsize=9)
    integer_x(ax, 10)
    y_grid(ax)
    zeros = sum(1 for s in series for v in s.values if is_zero(v))
    notes = [f"bands: the thresholds, {limits[0]:g} and {limits[1]:g} × the gradient at the output end"]
    if zeros:
        notes.append(f"{zeros} call(s) received exactly 0: the gradient underflowed before reaching them")
    return notes
