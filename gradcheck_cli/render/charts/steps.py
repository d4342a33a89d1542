"""The per-step panels of the optimisation probe and of a training history (``gradcheck history``).

``draw_step_totals``: the total gradient norm ÷ the first record's per recorded step, with the gain per
layer (a history) or the attenuation (the probe) beside it, each onset a vertical line (SVG ids
``onset-line``, ``onset-line-2``…); the probe's stable range 10^-3 … 10^3 as bands. ``draw_steps_per_layer``:
‖∂L/∂W‖ per layer at a few recorded steps, on the layer axis of the per-layer panel above it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradcheck_cli.render.charts.logaxis import Line, bands, draw_points, draw_series, finite_positive, log_scale
from gradcheck_cli.render.charts.style import BLUE, GRAD_THETA, GRAD_W, ORANGE, RED, TEXT, integer_x, y_grid
from gradcheck_cli.render.numbers import number
from gradcheck_cli.render.view import (
    OPTIMIZER_NAMES,
    Source,
    onset_problems,
    shown_rows,
    steps_view,
    trace_verdict,
)
from gradcheck_cli.report.sections import TrainingHistory

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAX_STEP_LINES = 8
"""At most this many recorded steps drawn as per-layer lines (first, onsets and last always)."""
STABLE_RANGE = (1e-3, 1e3)
"""The optimisation probe is stable while its total gradient norm stays within this range of step 0's."""


def step_ratios(trace: Source, shown: Sequence[int]) -> list[float]:
    """Total gradient norm of the ``shown`` records ÷ the first record's (NaN where that is not usable)."""
    reference = trace.steps[0].grad_norm if trace.steps else math.nan
    usable = finite_positive(reference)
    return [trace.steps[i].grad_norm / reference if usable else math.nan for i in shown]


def draw_step_totals(ax: Axes, trace: Source, shown: Sequence[int], points: str | None = None) -> None:
    """The totals of the ``shown`` records (indices into ``trace.steps``) and the gain or attenuation per
    step; with ``points``, one artist per record (SVG id ``{points}-<k>``), unhealthy records red."""
    view = steps_view(trace)
    training = isinstance(trace, TrainingHistory)
    records = [trace.steps[i] for i in shown]
    steps = [r.step for r in records]
    totals = step_ratios(trace, shown)
    second = [r.gain for r in records] if training else [r.attenuation for r in records]
    scale = log_scale([*totals, *second], include=(0.1, 10.0) if training else (1e-4, 1e4))
    scale.apply(ax)
    if not training:
        bands(ax, scale, STABLE_RANGE, ("collapsing", "exploding"), " × step 0")
    first = trace.steps[0].step if trace.steps else 0
    if not trace.steps or not finite_positive(trace.steps[0].grad_norm):
        ax.text(0.5, 0.5, f"no finite gradient norm at step {first} to compare with", transform=ax.transAxes,
                ha="center", color=TEXT)  # fmt: skip
    marker = None if points or len(steps) > 40 else "o"
    draw_series(ax, steps, totals, scale, Line(f"{GRAD_THETA} ÷ step {first}", BLUE, marker, markersize=3))
    if points:
        draw_points(ax, steps, totals, scale, [r.step in view.bad for r in records], points)
    what = "gain per layer" if training else "input ÷ output end"
    draw_series(ax, steps, second, scale, Line(what, ORANGE, marker, "--", 3))
    for k, at in enumerate(view.marked):
        history = trace if isinstance(trace, TrainingHistory) else None
        label = (
            f"{', '.join(onset_problems(history, at))} from step {at}" if history is not None else f"onset: step {at}"
        )
        ax.axvline(at, color=RED, ls=":", lw=1.4, label=label, gid="onset-line" if k == 0 else f"onset-line-{k + 1}")
    ax.set_xlabel("training step" if training else "optimiser step")
    losses = [view.loss(r) for r in records]
    if losses:
        ax.set_title(
            f"per step (loss {number(losses[0], '.3g')} → {number(losses[-1], '.3g')})", loc="left", fontsize=9
        )
    integer_x(ax, 4 if points is None else 10)
    y_grid(ax)


def draw_steps_per_layer(ax: Axes, trace: Source, names: Sequence[str]) -> None:
    """‖∂L/∂W‖ per layer for a few recorded steps, on the same layer axis as the panel above."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    view = steps_view(trace)
    index = {name: i for i, name in enumerate(names)}
    columns = sorted((index[name], k) for k, name in enumerate(trace.layers) if name in index)
    xs = [x for x, _ in columns]
    chosen = shown_rows(trace.steps, view.keep, limit=MAX_STEP_LINES)
    scale = log_scale([trace.steps[i].layer_grad_norms[k] for i in chosen for _, k in columns])
    scale.apply(ax)
    cmap = colormaps["viridis"]
    for n, i in enumerate(chosen):
        record = trace.steps[i]
        onset = view.label(record.step) is not None
        colour = RED if onset else to_hex(cmap(0.9 * n / max(1, len(chosen) - 1)))
        ys = [record.layer_grad_norms[k] for _, k in columns]
        label = f"step {record.step}" + (" (onset)" if onset else "")
        draw_series(ax, xs, ys, scale, Line(label, colour, "o" if len(xs) <= 30 else None, "-", 3, 4 if onset else 3))
    ax.set_ylabel(f"{GRAD_W} per layer (log)")
    ax.tick_params(axis="x", labelbottom=False)
    y_grid(ax)
    if isinstance(trace, TrainingHistory):
        every = f"every {trace.every} step{'' if trace.every == 1 else 's'}"
        head = f"training history: {len(trace.steps)} records {every} — {trace_verdict(trace)}"
        bad = bool(trace.onsets)
    else:
        name = OPTIMIZER_NAMES.get(trace.optimizer, trace.optimizer)
        head = f"optimisation probe: {name}, lr {trace.lr:g} — {trace_verdict(trace)}"
        bad = trace.verdict != "stable"
    ax.set_title(
        f"{head}\n{GRAD_W} per layer at {len(chosen)} of {len(trace.steps)} recorded steps (layers as above)",
        loc="left", fontsize=9, color=RED if bad else TEXT,
    )  # fmt: skip
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7.5, frameon=False, borderaxespad=0)
