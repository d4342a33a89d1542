"""The ``simulate`` picture: the gradient k layers (steps, iterations) back from the output end.

Chain, network and rnn modes: the simulated gradient (a Monte Carlo median with its min … max over seeds,
and the theory beside it); compare mode: gain^k of each remedy; map mode: |d fⁿ/dx| of the logistic map
and the shares of starting points beyond 1e-3 and 1e3. The thresholds are bands, the crossings lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradcheck_cli.render.charts.engine import SIDE_WIDTH, new_figure
from gradcheck_cli.render.charts.logaxis import (
    Line,
    bands,
    draw_series,
    finite_positive,
    is_bad,
    is_zero,
    log_scale,
    power,
)
from gradcheck_cli.render.charts.style import (
    BLUE,
    GREEN,
    GREY,
    ORANGE,
    RED,
    integer_x,
    legend_order,
    side_panel,
    y_grid,
)
from gradcheck_cli.render.numbers import number
from gradcheck_cli.simulate.report import EXPLODING_ABOVE, VANISHING_BELOW, SimulationReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

WORDS = ("vanishing", "exploding")


def simulation_figure_size(report: SimulationReport) -> tuple[float, float]:
    """The simulation picture's size in inches (times ``engine.DPI`` = pixels)."""
    return (11.0, 7.4) if report.mode == "map" else (11.0, 5.6)


UNITS = {"map": "iterations", "rnn": "time steps"}


def draw_simulation(report: SimulationReport) -> Figure:
    width, height = simulation_figure_size(report)
    figure = new_figure(width, height)
    colour = {"vanishing": RED, "exploding": RED, "stable": GREEN}.get(report.verdict, "black")
    figure.suptitle(
        f"gradcheck simulate · {report.mode} — {report.verdict}", fontsize=13, fontweight="bold", color=colour
    )
    if report.mode == "map":
        grid = figure.add_gridspec(2, 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH], height_ratios=[3, 1.6])
        ax = figure.add_subplot(grid[0, 0])
        shares = figure.add_subplot(grid[1, 0], sharex=ax)
        _draw_map(ax, shares, report)
        side_panel(figure.add_subplot(grid[1, 1]), *shares.get_legend_handles_labels(), [])
    else:
        grid = figure.add_gridspec(1, 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH])
        ax = figure.add_subplot(grid[0, 0])
        if report.mode == "compare" and report.rows:
            _draw_compare(ax, report)
        else:
            _draw_depth(ax, report)
    side = figure.add_subplot(grid[0, 1])
    side_panel(side, *legend_order(*ax.get_legend_handles_labels()), _simulation_notes(report))
    ax.set_title(_spec_line(report), loc="left", fontsize=9, color="#333333")
    return figure


def _xs(report: SimulationReport) -> list[int]:
    return [layer.index for layer in report.layers]


def _x_label(report: SimulationReport) -> str:
    if report.mode == "map":
        return "iterations n of f"
    return f"{UNITS.get(report.mode, 'layers')} back from the output end (k)"


def _draw_depth(ax: Axes, report: SimulationReport) -> None:
    """Chain, network and rnn modes: the gradient k layers (steps) back from the output end."""
    xs = _xs(report)
    values = [layer.value for layer in report.layers]
    theory = [layer.theory for layer in report.layers]
    has_theory = any(v is not None for v in theory)
    lows = [layer.low for layer in report.layers]
    highs = [layer.high for layer in report.layers]
    has_spread = any(v is not None for v in lows)
    scale = log_scale(
        [*values, *(v for v in theory if v is not None)], include=(VANISHING_BELOW / 10, EXPLODING_ABOVE * 10)
    )
    scale.apply(ax)
    bands(ax, scale, (VANISHING_BELOW, EXPLODING_ABOVE), WORDS, " × output end")
    marker = "o" if len(xs) <= 60 else None
    if report.mode == "chain":
        factor = report.spec.get("factor", report.gain)
        draw_series(ax, xs, values, scale, Line(f"factor$^k$ = {factor:g}$^k$", BLUE, marker, gid="chain-line"))
    else:
        if has_spread:
            lo = [v if finite_positive(v) else (scale.zero_y or math.nan) for v in lows]
            hi = [v if finite_positive(v) else math.nan for v in highs]
            seeds = report.monte_carlo.seeds if report.monte_carlo is not None else None
            ax.fill_between(
                xs, lo, hi, color=BLUE, alpha=0.18, lw=0, zorder=2,
                label=f"Monte Carlo min … max over {seeds} seeds" if seeds else "Monte Carlo min … max",
            )  # fmt: skip
        what = "gradient through time" if report.mode == "rnn" else "gradient norm"
        draw_series(ax, xs, values, scale, Line(f"Monte Carlo median {what}", BLUE, marker, gid="monte-carlo-line"))
        if has_theory:
            name = "theory: radius$^k$" if report.mode == "rnn" else "mean-field theory"
            draw_series(ax, xs, theory, scale, Line(name, "black", None, "--", zorder=3.5, gid="theory-line"))
    for key, threshold in (("vanishing", VANISHING_BELOW), ("exploding", EXPLODING_ABOVE)):
        depth = report.crossings.get(key)
        if depth:
            ax.axvline(
                depth, color=RED, ls=":", lw=1.2, zorder=1.5,
                label=f"crosses {threshold:g} at k = {depth}",
            )  # fmt: skip
    ax.set_xlabel(_x_label(report))
    ax.set_ylabel("gradient ÷ output end (log)")
    y_grid(ax)
    ax.set_xlim(min(xs, default=0) - 0.5, max(xs, default=1) + 0.5)
    integer_x(ax)


def _draw_compare(ax: Axes, report: SimulationReport) -> None:
    """Compare mode: gain^k for each remedy (its Monte Carlo gain), the configuration as given measured."""
    depth = report.depth
    ks = list(range(1, depth + 1))
    curves = [(row, [power(float(row["gain"]), k) for k in ks]) for row in report.rows if _gain_ok(row)]
    curves = [(row, [v if finite_positive(v) else math.nan for v in ys]) for row, ys in curves]
    measured = [layer.value for layer in report.layers]
    drawn = [v for _, ys in curves for v in ys if finite_positive(v)]  # lines past 1e300 leave the top
    scale = log_scale([*measured, *drawn], include=(VANISHING_BELOW / 10, EXPLODING_ABOVE * 10))
    scale.apply(ax)
    bands(ax, scale, (VANISHING_BELOW, EXPLODING_ABOVE), WORDS, " × output end")
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#1f78b4", "#444444"]
    ends: list[tuple[str, float, str]] = []
    for k, (row, ys) in enumerate(curves):
        given = row["remedy"] == "as given"
        colour = "black" if given else palette[k % len(palette)]
        ax.plot(
            ks, ys, color=colour, lw=2.2 if row["rank"] == 1 else 1.4, ls="--" if given else "-", zorder=3,
            label=f"{row['rank']}. {row['remedy']}: gain {float(row['gain']):.3g} ({row['verdict']})",
            gid=f"remedy-line-{row['rank']}",
        )  # fmt: skip
        ends.append((f"{row['rank']}. {row['remedy']}", ys[-1], colour))
    given = Line("as given: Monte Carlo median, measured", "black", "o" if depth <= 60 else None, "none", 3, 4)
    draw_series(ax, _xs(report), measured, scale, given)
    _end_labels(ax, depth, ends)
    ax.set_xlabel(_x_label(report))
    ax.set_ylabel("gradient ÷ output end (log)")
    y_grid(ax)
    ax.set_xlim(0.5, depth * 1.22 + 2)
    integer_x(ax)


def _end_labels(ax: Axes, x: float, labels: Sequence[tuple[str, float, str]]) -> None:
    """Name each line at its right end, nudged apart so that no two names overlap."""
    bottom, top = (math.log10(v) for v in ax.get_ylim())
    gap = 0.045 * (top - bottom)
    items = sorted(
        ((math.log10(y), text, colour) for text, y, colour in labels if finite_positive(y)),
        key=lambda item: item[0],
    )
    placed: list[float] = []
    for y, _, _ in items:
        placed.append(max(y, placed[-1] + gap) if placed else y)
    overshoot = (placed[-1] - (top - gap / 2)) if placed else 0.0
    if overshoot > 0:  # pushed off the top: move the whole stack down, keeping the gaps
        placed = [p - overshoot for p in placed]
    for (_, text, colour), y in zip(items, placed, strict=True):
        ax.text(x + 0.01 * x + 0.3, 10**y, text, fontsize=7.5, color=colour, va="center", ha="left")


def _gain_ok(row: dict[str, Any]) -> bool:
    gain = row.get("gain")
    return isinstance(gain, (int, float)) and gain > 0 and math.isfinite(gain)


def _draw_map(ax: Axes, shares: Axes, report: SimulationReport) -> None:
    """Map mode: max and median |d fⁿ/dx| over the starting points, and the shares beyond 1e-3 / 1e3."""
    xs = _xs(report)
    largest = [layer.value for layer in report.layers]
    median = [layer.extra.get("median_abs_derivative") for layer in report.layers]
    scale = log_scale([*largest, *median], include=(VANISHING_BELOW / 10, EXPLODING_ABOVE * 10))
    scale.apply(ax)
    bands(ax, scale, (VANISHING_BELOW, EXPLODING_ABOVE), WORDS, "")
    marker = "o" if len(xs) <= 60 else None
    r = report.spec.get("r", report.gain)
    draw_series(
        ax, xs, largest, scale, Line(f"max over x of |d$f^n$/dx| = r$^n$ (r = {r:g})", BLUE, marker, gid="map-max-line")
    )
    draw_series(ax, xs, median, scale, Line("median over x of |d$f^n$/dx|", ORANGE, marker))
    ax.set_ylabel("|d$f^n$/dx| (log)")
    ax.tick_params(axis="x", labelbottom=False)
    y_grid(ax)
    below = [layer.extra.get("share_below_1e-3", math.nan) for layer in report.layers]
    above = [layer.extra.get("share_above_1e3", math.nan) for layer in report.layers]
    shares.plot(xs, below, "-", marker=marker, color=RED, markersize=3, label="share of x with |d$f^n$/dx| < 1e-3")
    shares.plot(xs, above, "-", marker=marker, color=ORANGE, markersize=3, label="share of x with |d$f^n$/dx| > 1e3")
    shares.axhline(0.5, color=GREY, ls=":", lw=1, label="half: the verdict's majority")
    shares.set_ylim(-0.03, 1.03)
    shares.set_ylabel("share of starting x")
    shares.set_xlabel(_x_label(report))
    shares.grid(axis="y", color="#dddddd", lw=0.6)
    integer_x(shares)


def _spec_line(report: SimulationReport) -> str:
    spec = report.spec
    if report.mode == "chain":
        head = f"chain of {report.depth} factors {spec.get('factor', report.gain):g}"
    elif report.mode == "map":
        head = f"logistic map f(x) = r·x(1−x), r = {spec.get('r'):g}, {report.depth} iterations"
    elif report.mode == "rnn":
        head = (
            f"{spec.get('cell')} cell, {report.depth} steps, spectral radius {spec.get('radius'):g}, "
            f"hidden {spec.get('hidden')}, {spec.get('seeds')} seed(s)"
        )
    else:
        extras = [f"{spec.get('norm')} norm" if spec.get("norm") else "", "residual" if spec.get("residual") else ""]
        extra = "".join(f", {e}" for e in extras if e)
        head = (
            f"{report.depth} layers of {spec.get('activation')} + {spec.get('init')} init, width {spec.get('width')}"
            f"{extra}, {spec.get('seeds')} seed(s)"
        )
    unit = {"map": "iteration", "rnn": "step"}.get(report.mode, "layer")
    return f"{head}\ngain {number(report.gain, '.4g')} per {unit}, first ÷ last = {number(report.ratio, '.3g')}"


def _simulation_notes(report: SimulationReport) -> list[str]:
    notes: list[str] = []
    if report.mode == "compare":
        notes.append(
            "lines: gain^k from each remedy's Monte Carlo gain per layer (the geometric mean over the depth); "
            "dots: the configuration as given, measured layer by layer"
        )
    if report.theory is not None and report.monte_carlo is not None and report.mode in ("network", "rnn"):
        notes.append(
            f"theory gain {number(report.theory.gain, '.4g')}, Monte Carlo {number(report.monte_carlo.gain, '.4g')}"
        )
    notes.append(f"bands: below {VANISHING_BELOW:g} vanishing, above {EXPLODING_ABOVE:g} exploding")
    values = [layer.value for layer in report.layers]
    if any(is_zero(v) for v in values):
        notes.append("0: the gradient underflowed (grey strip at the bottom)")
    if any(is_bad(v) for v in values):
        notes.append("Inf/NaN: the gradient overflowed (grey strip at the top)")
    return notes
