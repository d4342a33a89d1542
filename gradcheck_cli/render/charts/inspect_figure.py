"""The inspect picture (``--plot`` of ``inspect`` and ``history``): panels stacked under one title.

The per-layer panel (forward order, input end left) with its legend and notes in the right-hand column;
under it, when there are any, the per-step panels (a training history's records, else the optimisation
probe's steps) and the gradient through time of modules that ran several times. A training history draws
the record where the first problem began (the last record when healthy) in the per-layer panel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradcheck_cli.render.charts.calls import MAX_CALL_SERIES, draw_through_time
from gradcheck_cli.render.charts.engine import SIDE_WIDTH, new_figure, panel_figure
from gradcheck_cli.render.charts.layer_axis import Tick, label_room, layer_ticks
from gradcheck_cli.render.charts.layers import draw_layer_panel, drawn_indices
from gradcheck_cli.render.charts.steps import draw_step_totals, draw_steps_per_layer
from gradcheck_cli.render.charts.style import GREEN, ORANGE, RED, legend_order, side_panel
from gradcheck_cli.render.numbers import count
from gradcheck_cli.render.view import Source, status_line, through_time, trace_verdict
from gradcheck_cli.report.report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def report_figure_size(report: Report) -> tuple[float, float]:
    """The inspect picture's size in inches (times ``engine.DPI`` = pixels)."""
    return _main_width(len(drawn_indices(report))) + SIDE_WIDTH, sum(_row_heights(report)) + 0.9


def layer_chart_size(report: Report) -> tuple[float, float]:
    """The per-layer panel alone (the HTML report's chart), in inches."""
    return _main_width(len(drawn_indices(report))) + SIDE_WIDTH, _row_heights(report)[0] + 0.2


def steps_source(report: Report) -> Source | None:
    """What the per-step panels draw: the training history of ``gradcheck history``, else the probe's steps."""
    source = report.history if report.history is not None else report.optimisation
    return source if source is not None and source.steps else None


def _rows(report: Report) -> list[str]:
    rows = ["main"]
    if steps_source(report) is not None:
        rows.append("steps")
    if through_time(report):
        rows.append("calls")
    return rows


def _ticks(report: Report) -> list[Tick]:
    return layer_ticks([report.layers[i].name for i in drawn_indices(report)])


def _row_heights(report: Report) -> list[float]:
    sizes = {"main": 4.3 + label_room(_ticks(report)), "steps": 3.4, "calls": 3.1}
    return [sizes[row] for row in _rows(report)]


def _main_width(n: int) -> float:
    return round(min(15.0, max(7.0, 5.0 + 0.1 * n)), 1)


def draw_report(report: Report) -> Figure:
    """The whole inspect picture, titled with the model and the verdict."""
    rows = _rows(report)
    width, height = report_figure_size(report)
    figure = new_figure(width, height)
    grid = figure.add_gridspec(
        len(rows), 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH], height_ratios=_row_heights(report)
    )
    status = status_line(report).replace("non_finite", "non-finite")
    what = "gradcheck history" if report.history is not None else "gradcheck"
    figure.suptitle(
        f"{what} · {report.run.model_type} ({count(report.run.parameters)} parameters) — {status}",
        fontsize=13, fontweight="bold", color=GREEN if report.healthy else RED if report.problems else ORANGE,
    )  # fmt: skip
    main = figure.add_subplot(grid[0, 0])
    notes = draw_layer_panel(main, report, _ticks(report)) + _panel_notes(report)
    side_panel(figure.add_subplot(grid[0, 1]), *legend_order(*main.get_legend_handles_labels()), notes)
    for row, kind in enumerate(rows[1:], start=1):
        if kind == "steps":
            trace = steps_source(report)
            assert trace is not None
            names = [report.layers[i].name for i in drawn_indices(report)]
            draw_steps_per_layer(figure.add_subplot(grid[row, 0], sharex=main), trace, names)
            totals = figure.add_subplot(grid[row, 1])
            draw_step_totals(totals, trace, range(len(trace.steps)))
            totals.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7.5, frameon=False, ncol=1)
        else:
            calls = figure.add_subplot(grid[row, 0])
            call_notes = draw_through_time(calls, report, through_time(report)[:MAX_CALL_SERIES])
            side_panel(figure.add_subplot(grid[row, 1]), *calls.get_legend_handles_labels(), call_notes)
    return figure


def draw_layer_chart(report: Report) -> Figure:
    """The per-layer panel with its legend and notes, untitled (the HTML report's chart)."""
    figure, main, side = panel_figure(*layer_chart_size(report))
    notes = draw_layer_panel(main, report, _ticks(report))
    side_panel(side, *legend_order(*main.get_legend_handles_labels()), notes)
    return figure


def _panel_notes(report: Report) -> list[str]:
    notes: list[str] = []
    trace = report.optimisation
    if trace is not None and trace.steps and trace.verdict != "stable":
        notes.append(f"optimisation probe: {trace_verdict(trace)} (panels below)")
    if report.history is not None and report.history.steps:
        notes.append(f"training history: {trace_verdict(report.history)} (panels below)")
    return notes
