"""Pictures for ``--plot FILE.png|FILE.svg``: the gradient along the model (inspect) or the simulation.

matplotlib is optional (``pip install 'gradcheck[plot]'``) and imported only here, inside the public
functions. Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot:
no global figure registry, no GUI backend, nothing left open. The style is reset to matplotlib's
defaults while drawing, so a user's matplotlibrc cannot change the size or look of the picture.

The inspect picture (forward order, input end on the left):

* ‖∂L/∂h‖ per layer relative to the output end (``act_grad_rel``), one marker per layer (SVG group id
  ``layer-point-<i>``), flagged layers in red; ‖∂L/∂W‖/‖W‖ relative to the output-end layer beside it;
* the thresholds as shaded bands, the fitted per-layer gain as a straight line (gain^k, k layers back
  from the output end), zeros in a strip at the bottom and NaN/Inf in a strip at the top;
* at most ``MAX_TICKS`` layer names: all of them, or one per block (``transformer.h.3.*``), or every k-th;
* a panel per extra signal: the per-call gradient of modules that ran several times (an RNN cell: the
  gradient through time), and the optimisation probe (per-layer ‖∂L/∂W‖ per step, and the trend).

A training history (``gradcheck history``) draws the same pictures: the main panel is the record where
the first problem began (the last record when healthy), and the per-step panels show the recorded
training steps (the total norm with the gain per layer, each onset as a vertical line).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.render.numbers import count, number
from gradcheck_cli.render.view import parameter_relative, relative_gradients
from gradcheck_cli.report.report import LayerStats, Report
from gradcheck_cli.report.sections import OptimisationTrace, TrainingHistory
from gradcheck_cli.simulate.report import EXPLODING_ABOVE, VANISHING_BELOW, SimulationReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg"}
DPI = 100
MAX_TICKS = 25
"""At most this many layer names under the x axis."""
MAX_LABEL = 34
"""Longer layer names are shortened in the middle."""
MAX_CALL_SERIES = 4
"""At most this many multi-call modules in the per-call panel."""
MAX_STEP_LINES = 8
"""At most this many optimiser steps drawn as per-layer lines (first, onset and last always)."""
SIDE_WIDTH = 3.1
"""Inches of the right-hand column: legend and notes, never on top of the data."""

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


# ---------------------------------------------------------------- public API


def plot_report(report: Report, path: Path) -> None:
    """Draw the inspect report to ``path`` (``.png`` or ``.svg``)."""
    fmt = plot_format(path)
    _save(lambda figure_class: _draw_report(figure_class, report), fmt, path)


def plot_simulation(report: SimulationReport, path: Path) -> None:
    """Draw a ``simulate`` report (chain, network, compare, rnn or map mode) to ``path`` (``.png`` or ``.svg``)."""
    fmt = plot_format(path)
    _save(lambda figure_class: _draw_simulation(figure_class, report), fmt, path)


def report_image(report: Report, fmt: str = "svg") -> bytes:
    """The inspect picture as bytes (``png`` or ``svg``), e.g. to embed an SVG in an HTML report."""
    return _render(lambda figure_class: _draw_report(figure_class, report), _checked(fmt))


def simulation_image(report: SimulationReport, fmt: str = "svg") -> bytes:
    """The simulation picture as bytes (``png`` or ``svg``)."""
    return _render(lambda figure_class: _draw_simulation(figure_class, report), _checked(fmt))


def plot_format(path: Path) -> str:
    """``png`` or ``svg`` from the file name's suffix; anything else is a one-line error."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise GradcheckError(f"--plot {path}: the picture's name must end in .png or .svg")
    return fmt


def report_figure_size(report: Report) -> tuple[float, float]:
    """The inspect picture's size in inches (times ``DPI`` = pixels)."""
    layers = _ordered(report)
    rows = _report_rows(report, layers)
    ticks = layer_ticks([layer.name for layer in layers])
    return _main_width(len(layers)) + SIDE_WIDTH, sum(_row_heights(rows, ticks)) + 0.9


def simulation_figure_size(report: SimulationReport) -> tuple[float, float]:
    """The simulation picture's size in inches (times ``DPI`` = pixels)."""
    return (11.0, 7.4) if report.mode == "map" else (11.0, 5.6)


@dataclass(frozen=True)
class Tick:
    """One label under the layer axis: layers ``start``…``end`` (indices in forward order) share it."""

    start: int
    end: int
    label: str

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


def layer_ticks(names: Sequence[str], limit: int = MAX_TICKS) -> list[Tick]:
    """At most ``limit`` labels for layers in forward order.

    Every layer when they fit; else consecutive layers of one block (``transformer.h.3.attn``,
    ``transformer.h.3.mlp.c_fc``…) share one label ``transformer.h.3.*``; when even the blocks do not
    fit, labels closer than ``len(names) / limit`` layers are dropped (the first and last kept).
    """
    if len(names) <= limit:
        return [Tick(i, i, _short(name or "(root)")) for i, name in enumerate(names)]
    labelled = [Tick(g.start, g.end, _short(g.label + ".*" if g.end > g.start else g.label)) for g in blocks(names)]
    gap = len(names) / limit  # labels closer than this (in layers) would overlap
    kept: list[Tick] = []
    for k, tick in enumerate(labelled):
        if not kept or tick.centre - kept[-1].centre >= gap:
            kept.append(tick)
        elif k == len(labelled) - 1:  # the output end keeps its name
            kept[-1] = tick
    if len(kept) <= limit:
        return kept
    return kept[:: math.ceil(len(kept) / limit)]


def blocks(names: Sequence[str]) -> list[Tick]:
    """Runs of consecutive layers with the same ``block_key``, labelled with the key."""
    groups: list[Tick] = []
    for i, name in enumerate(names):
        key = block_key(name)
        if groups and block_key(names[groups[-1].start]) == key and key != name:
            groups[-1] = Tick(groups[-1].start, i, groups[-1].label)
        else:
            groups.append(Tick(i, i, key))
    return groups


def block_key(name: str) -> str:
    """The repeated block a layer belongs to: the name up to its first numeric part.

    ``transformer.h.3.attn.c_attn`` → ``transformer.h.3``; ``layer2.1.conv1`` → ``layer2.1``;
    ``encoder.layers.0.linear1`` → ``encoder.layers.0``; a name without a numeric part is its own block.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


# ---------------------------------------------------------------- plumbing


def _checked(fmt: str) -> str:
    if fmt not in FORMATS.values():
        raise GradcheckError(f"picture format {fmt!r}: choose png or svg")
    return fmt


def _figure_class() -> type[Figure]:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise GradcheckError("--plot needs matplotlib: pip install 'gradcheck[plot]'") from None
    del matplotlib
    return Figure


@contextmanager
def _default_style() -> Iterator[None]:
    import matplotlib.style

    with matplotlib.style.context("default"):
        yield


def _render(draw: Any, fmt: str) -> bytes:
    figure_class = _figure_class()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    with _default_style():
        figure: Figure = draw(figure_class)
        try:
            FigureCanvasAgg(figure)
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            figure.savefig(buffer, format=fmt, dpi=DPI, metadata=metadata)
        finally:
            figure.clear()
    return buffer.getvalue()


def _save(draw: Any, fmt: str, path: Path) -> None:
    """Render fully in memory first: a failed drawing never leaves half a file behind."""
    data = _render(draw, fmt)
    Path(path).write_bytes(data)


def _short(label: str, limit: int = MAX_LABEL) -> str:
    if len(label) <= limit:
        return label
    keep = limit - 1
    return label[: keep - keep // 2] + "…" + label[-(keep // 2) :]


TINY = 1e-300
"""Below this a value is drawn as 0 (the subnormals and exact zeros: underflow)."""
HUGE = 1e300
"""Above this a value is drawn as Inf."""


def _finite_positive(value: float | None) -> TypeGuard[float]:
    return value is not None and TINY <= value <= HUGE


def _is_zero(value: float | None) -> bool:
    return value is not None and not math.isnan(value) and value < TINY


def _is_bad(value: float | None) -> bool:
    return value is not None and (math.isnan(value) or value > HUGE)


def _power(base: float, k: float) -> float:
    """base**k in log space, clamped to what a log axis can draw."""
    if base <= 0:
        return 0.0
    exponent = k * math.log10(base)
    return 10 ** max(-320.0, min(300.0, exponent)) if exponent < 300 else math.inf


# ---------------------------------------------------------------- log axis with zero / non-finite strips


NICE_STEPS = (1, 2, 3, 5, 10, 20, 25, 50, 100)


@dataclass(frozen=True)
class LogScale:
    """A log y axis over whole decades, with optional strips for zeros (bottom) and NaN/Inf (top)."""

    low: int
    """Lowest decade of the data range."""
    high: int
    zeros: bool = False
    """Whether a strip at the bottom shows values that are 0 (underflow)."""
    bad: bool = False
    """Whether a strip at the top shows NaN/Inf."""

    @property
    def strip(self) -> float:
        """Height of a strip in decades: visible however many decades the data spans."""
        return min(15.0, max(1.2, 0.08 * (self.high - self.low)), self.low + 306.0, 306.0 - self.high)

    @property
    def zero_y(self) -> float | None:
        """Where zeros are drawn (inside the bottom strip), or None when there are none."""
        return 10.0 ** (self.low - 0.7 * self.strip) if self.zeros else None

    @property
    def bad_y(self) -> float | None:
        """Where NaN/Inf are drawn (inside the top strip), or None."""
        return 10.0 ** (self.high + 0.7 * self.strip) if self.bad else None

    @property
    def zero_edge(self) -> float:
        """Top of the zero strip: the data range starts above it."""
        return 10.0 ** (self.low - 0.35 * self.strip)

    @property
    def bad_edge(self) -> float:
        """Bottom of the NaN/Inf strip."""
        return 10.0 ** (self.high + 0.35 * self.strip)

    def place(self, value: float | None) -> float | None:
        """The y at which to draw ``value`` (None: not drawn)."""
        if value is None:
            return None
        if _is_bad(value):
            return self.bad_y
        if _is_zero(value):
            return self.zero_y
        return value

    def apply(self, ax: Axes) -> None:
        """Log scale, limits, decade ticks inside the data range only (none in the strips), strip labels."""
        from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullLocator

        ax.set_yscale("log")
        bottom = 10.0 ** (self.low - (self.strip if self.zeros else 0.0))
        top = 10.0 ** (self.high + (self.strip if self.bad else 0.0))
        ax.set_ylim(bottom, top)
        span = self.high - self.low
        step = next((n for n in NICE_STEPS if span / n <= 10), math.ceil(span / 10))
        decades = [d for d in range(self.low, self.high + 1) if d % step == 0]
        ax.yaxis.set_major_locator(FixedLocator([10.0**d for d in decades]))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation())
        if step == 1 and span <= 8:
            minors = [m * 10.0**d for d in range(self.low, self.high) for m in range(2, 10)]
            ax.yaxis.set_minor_locator(FixedLocator(minors))
        else:
            ax.yaxis.set_minor_locator(NullLocator())
        label: dict[str, Any] = {"transform": ax.get_yaxis_transform(), "ha": "right", "va": "center"}
        if self.zeros:
            ax.axhspan(bottom, self.zero_edge, color=STRIP_FILL, zorder=0.6, lw=0)
            ax.text(-0.012, 10.0 ** (self.low - 0.7 * self.strip), "0", fontsize=9, **label)
        if self.bad:
            ax.axhspan(self.bad_edge, top, color=STRIP_FILL, zorder=0.6, lw=0)
            ax.text(-0.012, 10.0 ** (self.high + 0.7 * self.strip), "NaN/Inf", fontsize=8, **label)


def log_scale(values: Sequence[float | None], *, include: Sequence[float] = ()) -> LogScale:
    """The decades covering the finite positive ``values`` and ``include``, strips for zeros and NaN/Inf."""
    finite = [v for v in values if _finite_positive(v)]
    finite += [v for v in include if _finite_positive(v)]
    if not finite:
        finite = [1.0]
    low = math.floor(math.log10(min(finite)) + 1e-9)
    high = math.ceil(math.log10(max(finite)) - 1e-9)
    if high <= low:
        high = low + 1
    return LogScale(low=low, high=high, zeros=any(_is_zero(v) for v in values), bad=any(_is_bad(v) for v in values))


def _draw_series(
    ax: Axes,
    xs: Sequence[float],
    values: Sequence[float | None],
    scale: LogScale,
    *,
    label: str,
    color: str,
    marker: str | None = "o",
    linestyle: str = "-",
    markersize: float = 4.0,
    zorder: float = 3,
    gid: str | None = None,
) -> None:
    """A line through the finite positive values; zeros and NaN/Inf as marks in their strips."""
    ys = [v if _finite_positive(v) else math.nan for v in values]
    (line,) = ax.plot(
        xs, ys, linestyle=linestyle, marker=marker, markersize=markersize, color=color, label=label,
        lw=1.4, zorder=zorder,
    )  # fmt: skip
    line.set_gid(gid)
    zero_x = [x for x, v in zip(xs, values, strict=True) if _is_zero(v)]
    bad_x = [x for x, v in zip(xs, values, strict=True) if _is_bad(v)]
    if zero_x and scale.zero_y is not None:
        size = 5.0 if len(zero_x) <= 40 else 3.0
        ax.plot(zero_x, [scale.zero_y] * len(zero_x), "v", color=color, markersize=size, zorder=zorder, lw=0)
    if bad_x and scale.bad_y is not None:
        ax.plot(bad_x, [scale.bad_y] * len(bad_x), "X", color=RED, markersize=6, zorder=zorder, lw=0)


def _bands(ax: Axes, scale: LogScale, low: float, high: float, *, what: str) -> None:
    """Shade below ``low`` (vanishing) and above ``high`` (exploding), up to the strips or the axis limits."""
    bottom, top = ax.get_ylim()
    if scale.zero_y is not None:
        bottom = scale.zero_edge
    if scale.bad_y is not None:
        top = scale.bad_edge
    if bottom < low:
        ax.axhspan(bottom, low, color=VANISH_FILL, alpha=0.55, lw=0, zorder=0.5, label=f"vanishing: < {low:g}{what}")
    if top > high:
        ax.axhspan(high, top, color=EXPLODE_FILL, alpha=0.65, lw=0, zorder=0.5, label=f"exploding: > {high:g}{what}")
    ax.axhline(1.0, color=GREY, lw=0.8, ls=":", zorder=1)


def _side_panel(ax: Axes, handles: Sequence[Any], labels: Sequence[str], notes: Sequence[str]) -> None:
    """Legend at the top of the right-hand column, notes under it: nothing on top of the data."""
    ax.axis("off")
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.0, 1.0), frameon=False, fontsize=8)
    if notes:
        wrapped = "\n".join(textwrap.fill(note, 44, subsequent_indent="  ") for note in notes)
        ax.text(0.0, 0.0, wrapped, transform=ax.transAxes, fontsize=7.5, va="bottom", ha="left", color="#333333")


# ---------------------------------------------------------------- inspect


def _ordered(report: Report) -> list[LayerStats]:
    """Layers that ran, in forward order (input end first)."""
    return sorted((layer for layer in report.layers if layer.position >= 0), key=lambda layer: layer.position)


def _activation(report: Report) -> bool:
    return report.path.measured_with == "activation_gradients"


def _main_values(report: Report, layers: Sequence[LayerStats]) -> list[float | None]:
    """What the text table's ÷out column shows, for ``layers`` (render/view.py)."""
    return _by_layer(report, relative_gradients(report), layers)


def _param_values(report: Report, layers: Sequence[LayerStats]) -> list[float | None]:
    """‖∂L/∂W‖/‖W‖ ÷ that of the output-end layer, for ``layers``; NaN where the gradient is NaN/Inf."""
    return _by_layer(report, parameter_relative(report), layers)


def _by_layer(report: Report, values: dict[int, float | None], layers: Sequence[LayerStats]) -> list[float | None]:
    index = {id(layer): i for i, layer in enumerate(report.layers)}
    return [values.get(index[id(layer)]) for layer in layers]


def measured_points(report: Report) -> int:
    """How many layer points the inspect picture draws (one per layer that ran and has a value)."""
    layers = _ordered(report)
    return sum(v is not None for v in _main_values(report, layers))


def _multi_call(layers: Sequence[LayerStats]) -> list[LayerStats]:
    chosen = [layer for layer in layers if len(layer.act_grad_norms) > 1 or len(layer.time_grad_norms) > 1]
    return chosen[:MAX_CALL_SERIES]


def _report_rows(report: Report, layers: Sequence[LayerStats]) -> list[str]:
    rows = ["main"]
    trace = _steps_source(report)
    if trace is not None and trace.steps:
        rows.append("steps")
    if _multi_call(layers):
        rows.append("calls")
    return rows


def _label_room(ticks: Sequence[Tick]) -> float:
    longest = max((len(t.label) for t in ticks), default=4)
    return 0.35 + 0.052 * longest


def _row_heights(rows: Sequence[str], ticks: Sequence[Tick]) -> list[float]:
    sizes = {"main": 4.3 + _label_room(ticks), "steps": 3.4, "calls": 3.1}
    return [sizes[row] for row in rows]


def _main_width(n: int) -> float:
    return round(min(15.0, max(7.0, 5.0 + 0.1 * n)), 1)


def _draw_report(figure_class: type[Figure], report: Report) -> Figure:
    layers = _ordered(report)
    names = [layer.name for layer in layers]
    ticks = layer_ticks(names)
    rows = _report_rows(report, layers)
    width, height = report_figure_size(report)
    figure = figure_class(figsize=(width, height), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(
        len(rows), 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH], height_ratios=_row_heights(rows, ticks)
    )
    status = (
        "healthy" if report.healthy else "unhealthy: " + ", ".join(p.value.replace("_", "-") for p in report.problems)
    )
    what = "gradcheck history" if report.history is not None else "gradcheck"
    figure.suptitle(
        f"{what} · {report.run.model_type} ({count(report.run.parameters)} parameters) — {status}",
        fontsize=13, fontweight="bold", color=GREEN if report.healthy else RED,
    )  # fmt: skip
    main = figure.add_subplot(grid[0, 0])
    side = figure.add_subplot(grid[0, 1])
    notes = _draw_main(main, report, layers, ticks)
    handles, labels = _legend_order(*main.get_legend_handles_labels())
    _side_panel(side, handles, labels, notes)
    for row, kind in enumerate(rows[1:], start=1):
        if kind == "steps":
            trace = _steps_source(report)
            assert trace is not None
            left = figure.add_subplot(grid[row, 0], sharex=main)
            _draw_steps_per_layer(left, trace, names)
            _draw_steps_trend(figure.add_subplot(grid[row, 1]), trace)
        else:
            _draw_calls(figure.add_subplot(grid[row, 0]), figure.add_subplot(grid[row, 1]), _multi_call(layers))
    return figure


def _legend_order(handles: Sequence[Any], labels: Sequence[str]) -> tuple[list[Any], list[str]]:
    """Measurements first, then the fitted line, then the threshold bands."""

    def rank(label: str) -> int:
        if label.startswith(GRAD_H):
            return 0
        if label.startswith(("flagged", "exactly 0", "NaN")):
            return 1
        if label.startswith(("fitted", "theory", "mean-field", "crosses")):
            return 3
        if label.startswith(("vanishing", "exploding")):
            return 4
        return 2

    pairs = sorted(zip(handles, labels, strict=True), key=lambda pair: rank(pair[1]))
    return [h for h, _ in pairs], [label for _, label in pairs]


def _draw_main(ax: Axes, report: Report, layers: Sequence[LayerStats], ticks: Sequence[Tick]) -> list[str]:
    """The per-layer panel; returns the notes for the side column."""
    activation = _activation(report)
    low = report.thresholds.get("vanishing_attenuation", VANISHING_BELOW)
    high = report.thresholds.get("exploding_attenuation", EXPLODING_ABOVE)
    main_values = _main_values(report, layers)
    param_values = _param_values(report, layers) if activation else []
    xs = list(range(len(layers)))
    scale = log_scale([*main_values, *param_values], include=(low / 10, high * 10))
    scale.apply(ax)
    what = " × output end" if activation else " × output-end layer"
    _bands(ax, scale, low, high, what=what)
    notes: list[str] = []

    if not layers:
        ax.text(0.5, 0.5, "no layer ran: nothing to draw", transform=ax.transAxes, ha="center", color=GREY)
        return ["no module with parameters ran in the forward pass"]

    _gain_line(ax, report, layers)
    if activation:
        _draw_series(
            ax, xs, param_values, scale, label=f"{GRAD_W} / {WEIGHT}  ÷ output-end layer", color=ORANGE,
            marker="s", linestyle="--", markersize=3.0 if len(layers) <= 80 else 0.0, zorder=2.5,
        )  # fmt: skip
    main_label = f"{GRAD_H}  ÷ output end" if activation else f"{GRAD_W} / {WEIGHT}  ÷ output-end layer"
    ys = [v if _finite_positive(v) else math.nan for v in main_values]
    ax.plot(xs, ys, "-", color=BLUE, lw=1.6, zorder=3)
    _layer_points(ax, layers, main_values, scale, main_label)

    ax.set_xlim(-0.6, len(layers) - 0.4)
    _layer_axis(ax, layers, ticks)
    ax.set_ylabel(("activation gradient " if activation else "parameter gradient ratio ") + "÷ output end (log)")
    ax.set_title(_path_line(report), loc="left", fontsize=9, color="#333333")

    if not activation:
        notes.append(
            "activation gradients could not be measured (no module hooks): the parameter-gradient "
            "ratio ‖∂L/∂W‖/‖W‖ is drawn instead"
        )
    notes.append(f"bands: the thresholds, {low:g} and {high:g} × the gradient at the output end")
    zeros = sum(1 for v in main_values if _is_zero(v))
    if zeros:
        notes.append(
            f"{zeros} layer(s) received exactly 0 (underflow, or blocked by dead units): "
            "drawn in the grey strip at the bottom"
        )
    bad = sum(1 for v in main_values if _is_bad(v))
    if bad:
        notes.append(f"{bad} layer(s) have NaN/Inf gradients: ✕ in the grey strip at the top")
    missing = sum(1 for v in main_values if v is None)
    if missing:
        notes.append(f"{missing} layer(s) without a measurement are not drawn")
    never = sum(1 for layer in report.layers if layer.position < 0)
    if never:
        notes.append(f"{never} layer(s) never ran in the forward pass and are left out")
    trace = report.optimisation
    if trace is not None and trace.steps and trace.verdict != "stable":
        notes.append(f"optimisation probe: {_trace_verdict(trace)} (panels below)")
    if report.history is not None and report.history.steps:
        notes.append(f"training history: {_trace_verdict(report.history)} (panels below)")
    flagged = [layer.name or "(root)" for layer in layers if layer.flags]
    if flagged:
        shown = ", ".join(_short(name, 24) for name in flagged[:4]) + (" …" if len(flagged) > 4 else "")
        notes.append(f"flagged ({len(flagged)}): {shown}")
    return notes


def _layer_points(
    ax: Axes, layers: Sequence[LayerStats], values: Sequence[float | None], scale: LogScale, label: str
) -> None:
    """One artist per layer (SVG id ``layer-point-<i>``), so a picture's points can be counted."""
    size = 5.5 if len(layers) <= 60 else 4.0 if len(layers) <= 200 else 2.5
    legend: set[str] = set()
    for i, (layer, value) in enumerate(zip(layers, values, strict=True)):
        y = scale.place(value)
        if y is None:
            continue
        flagged = bool(layer.flags)
        if _is_bad(value):
            kind, marker, colour, edge = "NaN / Inf gradient", "X", RED, RED
        elif _is_zero(value):
            kind, marker, colour, edge = "exactly 0 (bottom strip)", "v", RED if flagged else BLUE, "black"
        elif flagged:
            kind, marker, colour, edge = "flagged layer (" + _flag_names(layers) + ")", "o", RED, "black"
        else:
            kind, marker, colour, edge = label, "o", BLUE, BLUE
        (artist,) = ax.plot(
            [i], [y], linestyle="none", marker=marker, markersize=size * (1.3 if marker != "o" else 1.0),
            color=colour, markeredgecolor=edge, markeredgewidth=0.6, zorder=4,
            label=kind if kind not in legend else "_nolegend_",
        )  # fmt: skip
        artist.set_gid(f"layer-point-{i}")
        legend.add(kind)


def _flag_names(layers: Sequence[LayerStats]) -> str:
    seen: list[str] = []
    for layer in layers:
        for flag in layer.flags:
            if flag not in seen:
                seen.append(flag)
    return ", ".join(flag.replace("_", " ") for flag in seen)


def _gain_line(ax: Axes, report: Report, layers: Sequence[LayerStats]) -> None:
    """gain^k from the output end back to the input end, as a straight line on the log axis."""
    path = report.path
    if path.gain is None or not _finite_positive(path.gain) or path.length < 2:
        return
    index = {layer.name: i for i, layer in enumerate(layers)}
    first, last = index.get(path.first_layer or ""), index.get(path.last_layer or "")
    if first is None or last is None or last <= first:
        return
    if any(layer.calls > 1 for layer in layers[first : last + 1]):
        return  # k counts calls there, not layers: a straight line over layers would mislead
    steps_per_x = (path.length - 1) / (last - first)
    xs = [first, last]
    ys = [_power(path.gain, (last - x) * steps_per_x) for x in xs]
    ax.plot(
        xs, ys, color=GREEN, lw=1.3, ls="-.", zorder=2,
        label=f"fitted gain {path.gain:.3g} per layer (gain$^k$)",
    )  # fmt: skip


def _path_line(report: Report) -> str:
    path = report.path
    what = GRAD_H if _activation(report) else f"{GRAD_W}/{WEIGHT}"
    run = report.run
    tail = f"{run.mode} mode, loss: {run.loss_kind.replace('_', ' ')} · {_short(run.source, 50)}"
    if report.history is not None:
        from gradcheck_cli.render.steps_chart import focus

        where = focus(report.history)
        at = f"the record at step {where[0]} ({where[1]})" if where is not None else "no record"
        tail = f"{at} · {_short(run.source, 50)}"
    if path.attenuation is None:
        return f"the gradient could not be followed from output to input\n{tail}"
    return (
        f"{what} at the input end ÷ output end = {number(path.attenuation, '.3g')} over {path.length} calls, "
        f"gain {number(path.gain, '.3g')} per layer\n{tail}"
    )


def _layer_axis(ax: Axes, layers: Sequence[LayerStats], ticks: Sequence[Tick]) -> None:
    """Names under the axis (≤ MAX_TICKS, rotated), block extents shaded, flagged names in red."""
    from matplotlib.ticker import FixedLocator, NullLocator

    grouped = any(t.end > t.start for t in ticks)
    positions = [t.centre if grouped else float(t.start) for t in ticks]
    ax.set_xticks(positions, [t.label for t in ticks], rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    if len(layers) <= 400 and len(ticks) < len(layers):
        ax.xaxis.set_minor_locator(FixedLocator(list(range(len(layers)))))
    else:
        ax.xaxis.set_minor_locator(NullLocator())
    for k, (tick, text) in enumerate(zip(ticks, ax.get_xticklabels(), strict=True)):
        text.set_gid(f"layer-tick-{k}")
        if any(layer.flags for layer in layers[tick.start : tick.end + 1]):
            text.set_color(RED)
    runs = [g for g in blocks([layer.name for layer in layers]) if g.end > g.start] if grouped else []
    if len(runs) <= MAX_TICKS:  # every other block shaded, where each block has its own name
        for run in runs[1::2]:
            ax.axvspan(run.start - 0.5, run.end + 0.5, color="#f2f2f2", zorder=0.2, lw=0)
    n = len(layers)
    if grouped:
        count_blocks = len(blocks([layer.name for layer in layers]))
        how = "names grouped by block" + (
            "" if len(ticks) == count_blocks else f", {len(ticks)} of {count_blocks} named"
        )
    elif len(ticks) == n:
        how = "every layer named"
    else:
        how = f"{len(ticks)} of {n} names shown"
    ax.set_xlabel(f"{n} layers in forward order, input end → output end ({how})")
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6, zorder=0.1)


def _steps_source(report: Report) -> OptimisationTrace | TrainingHistory | None:
    """What the per-step panels draw: the training history of ``gradcheck history``, else the probe's steps."""
    return report.history if report.history is not None else report.optimisation


def _draw_steps_per_layer(ax: Axes, trace: OptimisationTrace | TrainingHistory, names: Sequence[str]) -> None:
    """‖∂L/∂W‖ per layer for a few recorded steps, on the same layer axis as the panel above."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    from gradcheck_cli.render.steps_chart import shown_rows, steps_view

    view = steps_view(trace)
    index = {name: i for i, name in enumerate(names)}
    columns = [(index[name], k) for k, name in enumerate(trace.layers) if name in index]
    columns.sort()
    xs = [x for x, _ in columns]
    chosen = shown_rows(trace.steps, view.keep, limit=MAX_STEP_LINES)
    values = [trace.steps[i].layer_grad_norms[k] for i in chosen for _, k in columns]
    scale = log_scale(values)
    scale.apply(ax)
    cmap = colormaps["viridis"]
    for n, i in enumerate(chosen):
        record = trace.steps[i]
        onset = view.label(record.step) is not None
        colour = RED if onset else to_hex(cmap(0.9 * n / max(1, len(chosen) - 1)))
        label = f"step {record.step}" + (" (onset)" if onset else "")
        ys = [record.layer_grad_norms[k] for _, k in columns]
        _draw_series(
            ax, xs, ys, scale, label=label, color=colour, marker="o" if len(xs) <= 30 else None,
            markersize=3, linestyle="-", zorder=4 if onset else 3,
        )  # fmt: skip
    ax.set_ylabel(f"{GRAD_W} per layer (log)")
    ax.tick_params(axis="x", labelbottom=False)
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
    if isinstance(trace, TrainingHistory):
        every = f"every {trace.every} step{'' if trace.every == 1 else 's'}"
        head = f"training history: {len(trace.steps)} records {every} — {_trace_verdict(trace)}"
        bad = bool(trace.onsets)
    else:
        name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}.get(trace.optimizer, trace.optimizer)
        head = f"optimisation probe: {name}, lr {trace.lr:g} — {_trace_verdict(trace)}"
        bad = trace.verdict != "stable"
    ax.set_title(
        f"{head}\n{GRAD_W} per layer at {len(chosen)} of {len(trace.steps)} recorded steps (layers as above)",
        loc="left", fontsize=9, color=RED if bad else "#333333",
    )  # fmt: skip
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7.5, frameon=False, borderaxespad=0)


def _trace_verdict(trace: OptimisationTrace | TrainingHistory) -> str:
    if isinstance(trace, TrainingHistory):
        from gradcheck_cli.render.steps_chart import PROBLEM_WORDS

        if not trace.onsets:
            return "healthy"
        by_step: dict[int, list[str]] = {}
        for onset in trace.onsets:
            word = PROBLEM_WORDS.get(onset.problem, onset.problem)
            if onset.resolved_step is not None:
                word += f" (until step {onset.resolved_step})"
            by_step.setdefault(onset.step, []).append(word)
        return "; ".join(f"{', '.join(words)} from step {step}" for step, words in sorted(by_step.items()))
    if trace.verdict == "stable":
        return "stable"
    where = f" from step {trace.onset_step}" if trace.onset_step is not None else ""
    return {"non_finite": "NaN/Inf"}.get(trace.verdict, trace.verdict) + where


def _draw_steps_trend(ax: Axes, trace: OptimisationTrace | TrainingHistory) -> None:
    """Total gradient norm ÷ the first record and the attenuation (a history: the gain per layer) per step,
    each onset as a vertical line."""
    from gradcheck_cli.render.steps_chart import steps_view

    view = steps_view(trace)
    training = isinstance(trace, TrainingHistory)
    steps = [r.step for r in trace.steps]
    _integer_x(ax)
    first = trace.steps[0].step
    reference = trace.steps[0].grad_norm
    totals = [
        r.grad_norm / reference if _finite_positive(reference) and not math.isnan(r.grad_norm) else math.nan
        for r in trace.steps
    ]
    second = [r.gain for r in trace.steps] if training else [r.attenuation for r in trace.steps]
    scale = log_scale([*totals, *second], include=(0.1, 10.0))
    scale.apply(ax)
    marker = "o" if len(steps) <= 40 else None
    _draw_series(
        ax, steps, totals, scale, label=f"{GRAD_THETA} ÷ step {first}", color=BLUE, marker=marker, markersize=3
    )
    _draw_series(
        ax, steps, second, scale, label="gain per layer" if training else "input ÷ output end", color=ORANGE,
        marker=marker, linestyle="--", markersize=3,
    )  # fmt: skip
    for k, at in enumerate(view.marked):
        ax.axvline(
            at,
            color=RED,
            ls=":",
            lw=1.4,
            label=f"onset: step {at}",
            gid="onset-line" if k == 0 else f"onset-line-{k + 1}",
        )
    ax.set_xlabel("training step" if training else "optimiser step")
    losses = [view.loss(r) for r in trace.steps]
    ax.set_title(f"per step (loss {number(losses[0], '.3g')} → {number(losses[-1], '.3g')})", loc="left", fontsize=9)
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7.5, frameon=False, ncol=1)


def _draw_calls(ax: Axes, side: Axes, layers: Sequence[LayerStats]) -> None:
    """Modules that ran several times: ‖∂L/∂h‖ of each call (the gradient through time), first call left."""
    series: list[tuple[str, list[float | None]]] = []
    for layer in layers:
        if len(layer.act_grad_norms) > 1:
            series.append((f"{_short(layer.name, 28)}: {GRAD_H} per call", list(layer.act_grad_norms)))
        if len(layer.time_grad_norms) > 1:
            series.append((f"{_short(layer.name, 28)}: ‖∂L/∂x_t‖ per step", list(layer.time_grad_norms)))
    scale = log_scale([v for _, values in series for v in values])
    scale.apply(ax)
    colours = [BLUE, ORANGE, GREEN, "#6a3d9a", GREY, RED]
    for k, ((label, values), colour) in enumerate(zip(series, colours, strict=False)):
        xs = list(range(1, len(values) + 1))
        _draw_series(
            ax, xs, values, scale, label=label, color=colour, marker="o" if len(values) <= 60 else None,
            markersize=3, gid=f"call-series-{k}",
        )  # fmt: skip
    ax.set_xlabel("call (time step) in forward order: the first call is farthest from the loss")
    ax.set_ylabel(f"{GRAD_H} (log)")
    ax.set_title("modules that ran several times: the gradient through time", loc="left", fontsize=9)
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
    handles, labels = ax.get_legend_handles_labels()
    zeros = sum(1 for _, values in series for v in values if _is_zero(v))
    notes = ["absolute ‖∂L/∂h‖ of every call (not divided by the output end)"]
    if zeros:
        notes.append(f"{zeros} call(s) received exactly 0: the gradient underflowed before reaching them")
    _side_panel(side, handles, labels, notes)


# ---------------------------------------------------------------- simulate

UNITS = {"map": "iterations", "rnn": "time steps"}


def _draw_simulation(figure_class: type[Figure], report: SimulationReport) -> Figure:
    width, height = simulation_figure_size(report)
    figure = figure_class(figsize=(width, height), dpi=DPI, layout="constrained")
    colour = {"vanishing": RED, "exploding": RED, "stable": GREEN}.get(report.verdict, "black")
    figure.suptitle(
        f"gradcheck simulate · {report.mode} — {report.verdict}", fontsize=13, fontweight="bold", color=colour
    )
    if report.mode == "map":
        grid = figure.add_gridspec(2, 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH], height_ratios=[3, 1.6])
        ax = figure.add_subplot(grid[0, 0])
        shares = figure.add_subplot(grid[1, 0], sharex=ax)
        _draw_map(ax, shares, report)
        _side_panel(figure.add_subplot(grid[1, 1]), *shares.get_legend_handles_labels(), [])
    else:
        grid = figure.add_gridspec(1, 2, width_ratios=[width - SIDE_WIDTH, SIDE_WIDTH])
        ax = figure.add_subplot(grid[0, 0])
        if report.mode == "compare" and report.rows:
            _draw_compare(ax, report)
        else:
            _draw_depth(ax, report)
    side = figure.add_subplot(grid[0, 1])
    _side_panel(side, *_legend_order(*ax.get_legend_handles_labels()), _simulation_notes(report))
    ax.set_title(_spec_line(report), loc="left", fontsize=9, color="#333333")
    return figure


def _xs(report: SimulationReport) -> list[int]:
    return [layer.index for layer in report.layers]


def _x_label(report: SimulationReport) -> str:
    if report.mode == "map":
        return "iterations n of f"
    return f"{UNITS.get(report.mode, 'layers')} back from the output end (k)"


def _threshold_bands(ax: Axes, scale: LogScale, what: str = " × output end") -> None:
    _bands(ax, scale, VANISHING_BELOW, EXPLODING_ABOVE, what=what)


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
    _threshold_bands(ax, scale)
    marker = "o" if len(xs) <= 60 else None
    if report.mode == "chain":
        factor = report.spec.get("factor", report.gain)
        _draw_series(
            ax, xs, values, scale, label=f"factor$^k$ = {factor:g}$^k$", color=BLUE, marker=marker, gid="chain-line"
        )
    else:
        if has_spread:
            lo = [v if _finite_positive(v) else (scale.zero_y or math.nan) for v in lows]
            hi = [v if _finite_positive(v) else math.nan for v in highs]
            seeds = report.monte_carlo.seeds if report.monte_carlo is not None else None
            ax.fill_between(
                xs, lo, hi, color=BLUE, alpha=0.18, lw=0, zorder=2,
                label=f"Monte Carlo min … max over {seeds} seeds" if seeds else "Monte Carlo min … max",
            )  # fmt: skip
        what = "gradient through time" if report.mode == "rnn" else "gradient norm"
        _draw_series(
            ax, xs, values, scale, label=f"Monte Carlo median {what}", color=BLUE, marker=marker,
            gid="monte-carlo-line",
        )  # fmt: skip
        if has_theory:
            name = "theory: radius$^k$" if report.mode == "rnn" else "mean-field theory"
            _draw_series(
                ax, xs, theory, scale, label=name, color="black", marker=None, linestyle="--", zorder=3.5,
                gid="theory-line",
            )  # fmt: skip
    for key, threshold in (("vanishing", VANISHING_BELOW), ("exploding", EXPLODING_ABOVE)):
        depth = report.crossings.get(key)
        if depth:
            ax.axvline(
                depth, color=RED, ls=":", lw=1.2, zorder=1.5,
                label=f"crosses {threshold:g} at k = {depth}",
            )  # fmt: skip
    ax.set_xlabel(_x_label(report))
    ax.set_ylabel("gradient ÷ output end (log)")
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
    ax.set_xlim(min(xs, default=0) - 0.5, max(xs, default=1) + 0.5)
    _integer_x(ax)


def _draw_compare(ax: Axes, report: SimulationReport) -> None:
    """Compare mode: gain^k for each remedy (its Monte Carlo gain), the configuration as given measured."""
    depth = report.depth
    ks = list(range(1, depth + 1))
    curves = [(row, [_power(float(row["gain"]), k) for k in ks]) for row in report.rows if _gain_ok(row)]
    curves = [(row, [v if _finite_positive(v) else math.nan for v in ys]) for row, ys in curves]
    measured = [layer.value for layer in report.layers]
    drawn = [v for _, ys in curves for v in ys if _finite_positive(v)]  # lines past 1e300 leave the top
    scale = log_scale([*measured, *drawn], include=(VANISHING_BELOW / 10, EXPLODING_ABOVE * 10))
    scale.apply(ax)
    _threshold_bands(ax, scale)
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
    _draw_series(
        ax, _xs(report), measured, scale, label="as given: Monte Carlo median, measured", color="black",
        marker="o" if depth <= 60 else None, linestyle="none", markersize=3, zorder=4,
    )  # fmt: skip
    _end_labels(ax, depth, ends)
    ax.set_xlabel(_x_label(report))
    ax.set_ylabel("gradient ÷ output end (log)")
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
    ax.set_xlim(0.5, depth * 1.22 + 2)
    _integer_x(ax)


def _end_labels(ax: Axes, x: float, labels: Sequence[tuple[str, float, str]]) -> None:
    """Name each line at its right end, nudged apart so that no two names overlap."""
    bottom, top = (math.log10(v) for v in ax.get_ylim())
    gap = 0.045 * (top - bottom)
    items = sorted(
        ((math.log10(y), text, colour) for text, y, colour in labels if _finite_positive(y)),
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


def _integer_x(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))  # the per-step panel is narrow: 4-digit steps


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
    _threshold_bands(ax, scale, what="")
    marker = "o" if len(xs) <= 60 else None
    r = report.spec.get("r", report.gain)
    _draw_series(
        ax,
        xs,
        largest,
        scale,
        label=f"max over x of |d$f^n$/dx| = r$^n$ (r = {r:g})",
        color=BLUE,
        marker=marker,
        gid="map-max-line",
    )
    _draw_series(ax, xs, median, scale, label="median over x of |d$f^n$/dx|", color=ORANGE, marker=marker)
    ax.set_ylabel("|d$f^n$/dx| (log)")
    ax.tick_params(axis="x", labelbottom=False)
    ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
    below = [layer.extra.get("share_below_1e-3", math.nan) for layer in report.layers]
    above = [layer.extra.get("share_above_1e3", math.nan) for layer in report.layers]
    shares.plot(xs, below, "-", marker=marker, color=RED, markersize=3, label="share of x with |d$f^n$/dx| < 1e-3")
    shares.plot(xs, above, "-", marker=marker, color=ORANGE, markersize=3, label="share of x with |d$f^n$/dx| > 1e3")
    shares.axhline(0.5, color=GREY, ls=":", lw=1, label="half: the verdict's majority")
    shares.set_ylim(-0.03, 1.03)
    shares.set_ylabel("share of starting x")
    shares.set_xlabel(_x_label(report))
    shares.grid(axis="y", color="#dddddd", lw=0.6)
    _integer_x(shares)


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
    if any(_is_zero(v) for v in values):
        notes.append("0: the gradient underflowed (grey strip at the bottom)")
    if any(_is_bad(v) for v in values):
        notes.append("Inf/NaN: the gradient overflowed (grey strip at the top)")
    return notes
