"""The per-layer panel: each layer's gradient relative to the output end, input end left.

‖∂L/∂h‖ ÷ the output end's (``render.view.relative_gradients``), one marker per layer (SVG id
``layer-point-<k>``, k in forward order), flagged layers red, 0 in the bottom strip, NaN/Inf in the top
strip, a layer that received no gradient as a hollow circle at the bottom; ‖∂L/∂W‖/‖W‖ relative to the
output-end layer beside it; the range of a multi-call layer's calls as a vertical bar; the thresholds as
bands and the fitted per-layer gain as a straight line (gain^k, k layers back from the output end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gradcheck_cli.render.charts.layer_axis import Tick, draw_layer_axis
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
from gradcheck_cli.render.charts.style import BLUE, GRAD_H, GRAD_W, GREEN, GREY, ORANGE, RED, TEXT, WEIGHT, short
from gradcheck_cli.render.numbers import number
from gradcheck_cli.render.view import focus, forward_order, parameter_relative, relative_gradients, through_time
from gradcheck_cli.report.report import LayerStats, Report
from gradcheck_cli.simulate.report import EXPLODING_ABOVE, VANISHING_BELOW

if TYPE_CHECKING:
    from matplotlib.axes import Axes

_MARKS: dict[str, tuple[str, str, str, str]] = {
    # kind: (legend label, marker, colour, edge colour); "ok" takes the panel's own label
    "nonfinite": ("NaN / Inf gradient", "X", RED, RED),
    "zero": ("exactly 0 (bottom strip)", "v", BLUE, "black"),
    "nograd": ("no gradient reached it (bottom strip)", "o", "none", GREY),
    "flagged": ("flagged layer", "o", RED, "black"),
    "ok": ("", "o", BLUE, BLUE),
}


def drawn_indices(report: Report) -> list[int]:
    """Indices into ``report.layers`` of the layers on the axis: those that ran, in forward order."""
    return [i for i in forward_order(report) if report.layers[i].position >= 0]


def point_kind(layer: LayerStats, value: float | None) -> str | None:
    """How a layer's point is drawn: ``nonfinite``, ``zero``, ``nograd``, ``flagged``, ``ok``; None: not drawn."""
    if value is None:
        if "non_finite" in layer.flags:
            return "nonfinite"
        return "nograd" if "no_gradient" in layer.flags else None
    if is_bad(value):
        return "nonfinite"
    if is_zero(value):
        return "zero"
    return "flagged" if layer.flags else "ok"


def layer_values(report: Report) -> list[float | None]:
    """What the text table's ÷out column shows, for the layers on the axis (render/view.py)."""
    values = relative_gradients(report)
    return [values.get(i) for i in drawn_indices(report)]


def measured_points(report: Report) -> int:
    """How many layer points the panel draws."""
    layers = [report.layers[i] for i in drawn_indices(report)]
    return sum(point_kind(layer, v) is not None for layer, v in zip(layers, layer_values(report), strict=True))


def activation_measured(report: Report) -> bool:
    """Whether the activation gradients were measured (else the parameter-gradient ratio is drawn)."""
    return report.path.measured_with == "activation_gradients"


def draw_layer_panel(ax: Axes, report: Report, ticks: Sequence[Tick]) -> list[str]:
    """The per-layer panel on ``ax``; returns the notes for the side column."""
    indices = drawn_indices(report)
    layers = [report.layers[i] for i in indices]
    activation = activation_measured(report)
    limits = (
        report.thresholds.get("vanishing_attenuation", VANISHING_BELOW),
        report.thresholds.get("exploding_attenuation", EXPLODING_ABOVE),
    )
    values = layer_values(report)
    kinds = [point_kind(layer, v) for layer, v in zip(layers, values, strict=True)]
    placed = [
        {"nonfinite": math.nan, "nograd": 0.0}.get(k or "", v) if v is None else v
        for k, v in zip(kinds, values, strict=True)
    ]
    ratios = parameter_relative(report) if activation else {}
    params = [ratios.get(i) for i in indices]
    calls = [t for t in through_time(report) if t.unit == "call"]
    spans = [v for t in calls for v in t.values]
    scale = log_scale(
        [*placed, *params], include=(limits[0] / 10, limits[1] * 10, *(v for v in spans if finite_positive(v)))
    )
    scale.apply(ax)
    bands(ax, scale, limits, ("vanishing", "exploding"), " × output end" if activation else " × output-end layer")
    if not layers:
        ax.text(0.5, 0.5, "no layer ran: nothing to draw", transform=ax.transAxes, ha="center", color=GREY)
        return ["no module with parameters ran in the forward pass"]
    _gain_line(ax, report, layers)
    xs = list(range(len(layers)))
    if activation:
        draw_series(
            ax, xs, params, scale,
            Line(f"{GRAD_W} / {WEIGHT}  ÷ output-end layer", ORANGE, "s", "--", 3.0 if len(layers) <= 80 else 0.0, 2.5),
        )  # fmt: skip
    position = {i: k for k, i in enumerate(indices)}
    for series in calls:
        finite = [v for v in series.values if finite_positive(v)]
        if finite and series.index in position:
            ax.vlines(position[series.index], min(finite), max(finite), color=BLUE, lw=3, alpha=0.35, zorder=2.8)
    label = f"{GRAD_H}  ÷ output end" if activation else f"{GRAD_W} / {WEIGHT}  ÷ output-end layer"
    ax.plot(xs, [v if finite_positive(v) else math.nan for v in placed], "-", color=BLUE, lw=1.6, zorder=3)
    _layer_points(ax, layers, kinds, [scale.place(v) for v in placed], label)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    draw_layer_axis(ax, layers, ticks)
    ax.set_ylabel(("activation gradient " if activation else "parameter gradient ratio ") + "÷ output end (log)")
    ax.set_title(path_line(report), loc="left", fontsize=9, color=TEXT)
    return _notes(report, layers, kinds, limits) + (["a vertical bar spans a layer's calls"] if calls else [])


def _layer_points(
    ax: Axes, layers: Sequence[LayerStats], kinds: Sequence[str | None], ys: Sequence[float | None], label: str
) -> None:
    """One artist per layer (SVG id ``layer-point-<k>``), so that a picture's points can be counted."""
    size = 5.5 if len(layers) <= 60 else 4.0 if len(layers) <= 200 else 2.5
    flags = _flag_names(layers)
    legend: set[str] = set()
    for k, (layer, kind, y) in enumerate(zip(layers, kinds, ys, strict=True)):
        if kind is None or y is None:
            continue
        words, marker, colour, edge = _MARKS[kind]
        words = label if kind == "ok" else f"{words} ({flags})" if kind == "flagged" else words
        if kind == "zero" and layer.flags:
            colour = RED
        options: dict[str, Any] = {"markerfacecolor": colour} if kind == "nograd" else {"color": colour}
        (artist,) = ax.plot(
            [k], [y], linestyle="none", marker=marker, markersize=size * (1.3 if marker != "o" else 1.0),
            markeredgecolor=edge, markeredgewidth=0.6 if kind != "nograd" else 1.2, zorder=4,
            label=words if words not in legend else "_nolegend_", **options,
        )  # fmt: skip
        artist.set_gid(f"layer-point-{k}")
        legend.add(words)


def _notes(
    report: Report, layers: Sequence[LayerStats], kinds: Sequence[str | None], limits: tuple[float, float]
) -> list[str]:
    notes: list[str] = []
    if not activation_measured(report):
        notes.append(
            "activation gradients could not be measured (no module hooks): the parameter-gradient "
            "ratio ‖∂L/∂W‖/‖W‖ is drawn instead"
        )
    notes.append(f"bands: the thresholds, {limits[0]:g} and {limits[1]:g} × the gradient at the output end")
    counted = {kind: kinds.count(kind) for kind in ("zero", "nonfinite", "nograd", None)}
    if counted["zero"]:
        notes.append(
            f"{counted['zero']} layer(s) received exactly 0 (underflow, or blocked by dead units): "
            "drawn in the grey strip at the bottom"
        )
    if counted["nonfinite"]:
        notes.append(f"{counted['nonfinite']} layer(s) have NaN/Inf gradients: ✕ in the grey strip at the top")
    if counted["nograd"]:
        notes.append(f"{counted['nograd']} layer(s) received no gradient: ○ in the grey strip at the bottom")
    if counted[None]:
        notes.append(f"{counted[None]} layer(s) without a measurement are not drawn")
    never = sum(1 for layer in report.layers if layer.position < 0)
    if never:
        notes.append(f"{never} layer(s) never ran in the forward pass and are left out")
    flagged = [layer.name or "(root)" for layer in layers if layer.flags]
    if flagged:
        shown = ", ".join(short(name, 24) for name in flagged[:4]) + (" …" if len(flagged) > 4 else "")
        notes.append(f"flagged ({len(flagged)}): {shown}")
    return notes


def _flag_names(layers: Sequence[LayerStats]) -> str:
    seen: list[str] = []
    for layer in layers:
        for flag in layer.flags:
            if flag not in seen:
                seen.append(flag)
    return ", ".join(flag.replace("_", " ") for flag in seen)


def _gain_line(ax: Axes, report: Report, layers: Sequence[LayerStats]) -> None:
    """gain^k from the output end back to the input end, as a straight line on the log axis (SVG id ``fit-line``)."""
    path = report.path
    if path.gain is None or not finite_positive(path.gain) or path.length < 2:
        return
    index = {layer.name: i for i, layer in enumerate(layers)}
    first, last = index.get(path.first_layer or ""), index.get(path.last_layer or "")
    if first is None or last is None or last <= first:
        return
    if any(layer.calls > 1 for layer in layers[first : last + 1]):
        return  # k counts calls there, not layers: a straight line over layers would mislead
    steps_per_x = (path.length - 1) / (last - first)
    xs = [first, last]
    ys = [power(path.gain, (last - x) * steps_per_x) for x in xs]
    (line,) = ax.plot(
        xs, ys, color=GREEN, lw=1.3, ls="-.", zorder=2, label=f"fitted gain {path.gain:.3g} per layer (gain$^k$)"
    )
    line.set_gid("fit-line")


def path_line(report: Report) -> str:
    """The panel's title: the attenuation and gain along the path, then the run (or the history's record)."""
    path = report.path
    what = GRAD_H if activation_measured(report) else f"{GRAD_W}/{WEIGHT}"
    run = report.run
    tail = f"{run.mode} mode, loss: {run.loss_kind.replace('_', ' ')} · {short(run.source, 50)}"
    if report.history is not None:
        where = focus(report.history)
        at = f"the record at step {where[0]} ({where[1]})" if where is not None else "no record"
        tail = f"{at} · {short(run.source, 50)}"
    if path.attenuation is None:
        return f"the gradient could not be followed from output to input\n{tail}"
    return (
        f"{what} at the input end ÷ output end = {number(path.attenuation, '.3g')} over {path.length} calls, "
        f"gain {number(path.gain, '.3g')} per layer\n{tail}"
    )
