"""What every renderer shows of the layers, computed once: forward order and each layer's gradient relative
to the output end (the number the text table, the Markdown table, the SVG chart and the plot all draw)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from gradcheck_cli.report.report import Report
from gradcheck_cli.report.sections import Onset, TrainingHistory


def forward_order(report: Report) -> list[int]:
    """Indices into ``report.layers`` in forward order; layers that never ran last, in definition order."""
    return sorted(
        range(len(report.layers)), key=lambda i: (report.layers[i].position < 0, report.layers[i].position, i)
    )


def relative_gradients(report: Report) -> dict[int, float | None]:
    """Each layer's gradient relative to the output end, by index into ``report.layers``.

    With activation hooks: ‖∂L/∂h‖ ÷ the output end's, and the norm itself where it is NaN/Inf. Without
    (TorchScript, ``torch.export``): :func:`parameter_relative`.
    """
    if report.path.measured_with != "activation_gradients":
        return parameter_relative(report)
    values: dict[int, float | None] = {}
    for i, layer in enumerate(report.layers):
        rel = layer.act_grad_rel
        if rel is None and layer.act_grad_norm is not None and not math.isfinite(layer.act_grad_norm):
            rel = layer.act_grad_norm
        values[i] = rel
    return values


def parameter_relative(report: Report) -> dict[int, float | None]:
    """‖∂L/∂W‖/‖W‖ of each layer ÷ that of the output end (the last layer that ran with a finite, positive
    ratio); NaN where the layer's gradient is NaN/Inf, None where it has none. By index, in forward order."""
    layers = report.layers
    order = forward_order(report)
    reference = next((r for i in reversed(order) if _finite_positive(r := layers[i].grad_weight_ratio)), None)
    values: dict[int, float | None] = {}
    for i in order:
        layer = layers[i]
        if layer.grad_norm is not None and not math.isfinite(layer.grad_norm):
            values[i] = math.nan
            continue
        ratio = layer.grad_weight_ratio
        values[i] = None if ratio is None or reference is None else ratio / reference
    return values


def _finite_positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Verdict:
    """The words of the verdict every format shows, chosen once."""

    healthy: bool
    problems: tuple[str, ...]
    """The problems' names (``vanishing``, ``non_finite``…), empty when healthy."""
    summary: str
    """Healthy: what that means here (the gradients flow; or no problem at any recorded step of a training
    history). Unhealthy: the problems, comma-separated."""
    onset_step: int | None
    """A training history's first step where one of the problems began; None otherwise."""


def verdict(report: Report) -> Verdict:
    """The verdict of ``report`` in words: healthy or the problems, and for a history since which step."""
    history = report.history
    problems = tuple(p.value for p in report.problems)
    if report.healthy:
        summary = "gradients flow from the output to the input"
        if history is not None:
            n = len(history.steps)
            summary = f"no problem at any of the {n} recorded step{'' if n == 1 else 's'}"
        return Verdict(True, (), summary, None)
    first = first_onset(history, problems) if history is not None else None
    return Verdict(False, problems, ", ".join(problems), None if first is None else first.step)


def first_onset(history: TrainingHistory, problems: Iterable[str] | None = None) -> Onset | None:
    """The earliest onset, among ``problems`` when given (the report's problems: a repaired one may not count)."""
    wanted = None if problems is None else set(problems)
    chosen = [o for o in history.onsets if wanted is None or o.problem in wanted]
    return min(chosen, key=lambda o: o.step, default=None)
