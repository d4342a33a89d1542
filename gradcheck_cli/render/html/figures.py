"""The page's charts: drawn by the chart engine (matplotlib, the same panels as ``--plot``), inlined as SVG.

Every point carries a tooltip (``<title>``) with its numbers; a layer's point links to its row of the layer
table (``#L{index}``). The classes the page's style sheet and the tests look for: ``pt`` (a layer point,
with its kind: ``ok``, ``flagged``, ``zero``, ``nonfinite``, ``nograd``), ``call``, ``step``, ``record``
(with ``flagged`` when red), ``onset``, ``fit`` and ``band``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradcheck_cli.render.charts.calls import draw_through_time, series_label, thresholds
from gradcheck_cli.render.charts.engine import panel_figure, render
from gradcheck_cli.render.charts.inline_svg import Mark, inline_svg
from gradcheck_cli.render.charts.inspect_figure import draw_layer_chart
from gradcheck_cli.render.charts.layers import activation_measured, drawn_indices, layer_values, point_kind
from gradcheck_cli.render.charts.steps import draw_step_totals, step_ratios
from gradcheck_cli.render.charts.style import legend_order, side_panel
from gradcheck_cli.render.numbers import number
from gradcheck_cli.render.view import (
    PROBLEM_WORDS,
    Source,
    ThroughTime,
    onset_problems,
    shown_rows,
    steps_view,
    through_time,
)
from gradcheck_cli.report.report import LayerStats, Report
from gradcheck_cli.report.sections import TrainingHistory

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_HISTORY_POINTS = 300
"""A training history's chart and table show at most this many records (first, onsets and last kept)."""
KIND_WORDS = {
    "zero": "underflowed to exactly 0",
    "nonfinite": "NaN/Inf",
    "nograd": "no gradient reached it",
}
WIDE = (10.5, 3.6)
"""Inches of the per-step and through-time charts."""


def layer_chart_svg(report: Report) -> str:
    """The per-layer panel, one linked point per drawn layer."""
    what = "∂L/∂h ÷ output end" if activation_measured(report) else "(‖∂L/∂W‖/‖W‖) ÷ last layer's"
    calls = {t.index: t.values for t in through_time(report) if t.unit == "call"}
    marks: dict[str, Mark] = {}
    for k, (index, value) in enumerate(zip(drawn_indices(report), layer_values(report), strict=True)):
        layer = report.layers[index]
        kind = point_kind(layer, value)
        if kind is not None:
            tip = _layer_tooltip(layer, value, kind, what, calls.get(index, ()))
            marks[f"layer-point-{k}"] = Mark(tip, f"pt {kind}", f"#L{index}")
    if report.path.gain is not None:
        marks["fit-line"] = Mark(f"fitted gain {number(report.path.gain)} per layer", "fit")
    marks["band-low"] = Mark("beyond the vanishing threshold", "band vanishing")
    marks["band-high"] = Mark("beyond the exploding threshold", "band exploding")
    label = f"gradient per layer, {what}, log scale, input end left, output end right"
    svg = render(lambda: draw_layer_chart(report), "svg")
    return inline_svg(svg, name="layers", kind="layers", label=label, marks=marks)


def _layer_tooltip(layer: LayerStats, value: float | None, kind: str, what: str, calls: tuple[float, ...]) -> str:
    position = "–" if layer.position < 0 else str(layer.position)
    text = f"#{position} {layer.name or '(root)'} ({layer.type})\n{what}: {number(value, '.3g')}"
    if kind in KIND_WORDS:
        text += f" — {KIND_WORDS[kind]}"
    if calls:
        finite = [v for v in calls if math.isfinite(v)]
        zeros = sum(1 for v in calls if v == 0)
        text += f"\n{len(calls)} calls"
        if finite:
            text += f": {number(min(finite), '.2g')} … {number(max(finite), '.2g')}"
        if zeros:
            text += f", {zeros} underflowed to 0"
    if layer.grad_norm is not None:
        text += f"\n‖∂L/∂W‖ {number(layer.grad_norm, '.3g')}"
    if layer.flags:
        text += f"\nflags: {', '.join(layer.flags)}"
    return text


def time_chart_svg(report: Report, series: ThroughTime, number_on_page: int) -> str:
    """One layer's gradient per call (or per time step), first call left."""
    name = report.layers[series.index].name or "(root)"
    what = "‖∂L/∂h‖ ÷ output end" if series.unit == "call" else "‖∂L/∂x_t‖ ÷ last step"
    low, high = thresholds(report)
    n = len(series.values)
    marks = {
        f"call-{k}": Mark(
            f"{name}, {series.unit} {k + 1} of {n}: {what} {number(v, '.3g')}", _css("call", not low <= v <= high)
        )
        for k, v in enumerate(series.values)
    }

    def draw() -> Figure:
        figure, ax, side = panel_figure(*WIDE)
        notes = draw_through_time(ax, report, [series], points="call")
        side_panel(side, *ax.get_legend_handles_labels(), notes)
        return figure

    label = f"{series_label(report, series)}: first {series.unit} left, log scale"
    return inline_svg(render(draw, "svg"), name=f"time-{number_on_page}", kind="time", label=label, marks=marks)


def steps_chart_svg(trace: Source, shown: list[int] | None = None) -> str:
    """The total gradient norm per recorded step ÷ the first record's: the optimisation probe's steps, or
    a training history's ``shown`` records (:func:`history_points`)."""
    training = isinstance(trace, TrainingHistory)
    shown = list(range(len(trace.steps))) if shown is None else shown
    kind = "record" if training else "step"
    view = steps_view(trace)
    ratios = step_ratios(trace, shown)
    first = trace.steps[0].step if trace.steps else 0
    unhealthy = dict(trace.problem_steps) if isinstance(trace, TrainingHistory) else {}
    marks: dict[str, Mark] = {}
    for k, (i, ratio) in enumerate(zip(shown, ratios, strict=True)):
        record = trace.steps[i]
        tip = (
            f"step {record.step}: loss {number(view.loss(record), '.4g')}, ‖∂L/∂θ‖ {number(record.grad_norm, '.3g')} "
            f"({number(ratio, '.3g')}× step {first}), attenuation {number(record.attenuation, '.3g')}, "
            f"gain {number(record.gain, '.3g')}"
        )
        problems = unhealthy.get(record.step)
        if problems:
            tip += f"\nunhealthy: {', '.join(PROBLEM_WORDS.get(p, p) for p in problems)}"
        marks[f"{kind}-{k}"] = Mark(tip, _css(kind, record.step in view.bad))
    for k, at in enumerate(view.marked):
        words = (
            f"{', '.join(onset_problems(trace, at))} from {at}"
            if isinstance(trace, TrainingHistory)
            else f"onset: {at}"
        )
        marks["onset-line" if k == 0 else f"onset-line-{k + 1}"] = Mark(words, "onset")

    def draw() -> Figure:
        figure, ax, side = panel_figure(*WIDE)
        draw_step_totals(ax, trace, shown, points=kind)
        side_panel(side, *legend_order(*ax.get_legend_handles_labels()), [])
        return figure

    what = "recorded training step" if training else "optimiser step"
    label = f"total gradient norm per {what}, ÷ step {first}, log scale"
    chart = "history" if training else "steps"
    return inline_svg(render(draw, "svg"), name=chart, kind=chart, label=label, marks=marks)


def history_points(history: TrainingHistory) -> list[int]:
    """Indices of the records the page's chart and table show: all up to ``MAX_HISTORY_POINTS``."""
    return shown_rows(history.steps, steps_view(history).keep, limit=MAX_HISTORY_POINTS)


def _css(kind: str, red: bool) -> str:
    return f"{kind} flagged" if red else kind
