"""What every renderer shows of the layers, computed once: forward order and each layer's gradient relative
to the output end (the number the text table, the Markdown table, the SVG chart and the plot all draw)."""

from __future__ import annotations

import math

from gradcheck_cli.report.report import Report


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
