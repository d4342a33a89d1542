"""The path of a model whose module hooks cannot fire (TorchScript): its bias gradients, or "not measured".

The probe reads such a model through :class:`~gradcheck_cli.probe.program_hooks.BiasGradientRecorder`: each
layer that owns a bias gets one "call" whose norm is ‖∂L/∂b‖ = ‖Σᵢ ∂L/∂yᵢ‖, the batch-summed gradient of its
output. With two or more such layers that is the path, followed in definition order. Without (no layer has a
bias), nothing measured sees the backward signal: ‖∂L/∂W‖/‖W‖ stays level while it explodes
(docs/calibration.md, "Programs: TorchScript and torch.export"), so the path is reported as not measured
(``measured_with`` ``not_measured``, no attenuation) and never read as healthy.
"""

from __future__ import annotations

from gradcheck_cli.diagnose.paths import Path, follow
from gradcheck_cli.diagnose.rule_codes import PARAMETER_GRADIENTS_ONLY
from gradcheck_cli.probe.results import ProbeResult
from gradcheck_cli.report.report import NOT_MEASURED, Finding, Severity

BIAS_GRADIENTS = "bias_gradients"
MIN_POINTS = 2


def program_path(result: ProbeResult) -> list[tuple[int, float]]:
    """(layer index, ‖∂L/∂b‖) of every layer whose bias got a gradient, in definition order; empty when fewer
    than two (no path to follow)."""
    points = []
    for layer, call in result.call_order:
        norm = result.layers[layer].calls[call]
        if norm is not None:
            points.append((layer, norm.l2))
    return points if len(points) >= MIN_POINTS else []


def program_route(result: ProbeResult, limits: tuple[float, float]) -> Path:
    """The path to judge without module hooks: the bias gradients in definition order, or no path at all (never
    ‖∂L/∂W‖/‖W‖, which stays level while the backward signal explodes)."""
    return follow(result, limits) if program_path(result) else Path((), None)


def program_measured_with(result: ProbeResult) -> str:
    """``bias_gradients``, or ``not_measured`` when no two layers have a bias to read the path through."""
    return BIAS_GRADIENTS if program_path(result) else NOT_MEASURED


def program_finding(result: ProbeResult) -> Finding:
    """GC006: how the path was followed without module hooks, or that it could not be (a warning then)."""
    points = program_path(result)
    with_params = sum(1 for m in result.layers if m.grad is not None)
    if points:
        return Finding(
            PARAMETER_GRADIENTS_ONLY.code,
            PARAMETER_GRADIENTS_ONLY.name,
            Severity.INFO,
            None,
            None,
            f"module hooks do not fire on this model (TorchScript), so the path is followed through the bias "
            f"gradients ‖∂L/∂b‖ (the batch-summed output gradients) of {len(points)} of {len(result.layers)} layers, "
            "in definition order",
            {"measured_layers": len(points), "layers": len(result.layers)},
        )
    return Finding(
        PARAMETER_GRADIENTS_ONLY.code,
        PARAMETER_GRADIENTS_ONLY.name,
        Severity.WARNING,
        None,
        None,
        f"the gradient path could not be measured: module hooks do not fire on this model (TorchScript) and fewer "
        f"than two of its {len(result.layers)} layers have a bias to read it through; parameter gradients "
        f"({with_params} layers) stay level while the backward signal vanishes or explodes, so this is no "
        "verdict of health: check the eager model (--model), or export it with torch.export (.pt2)",
        {"measured_layers": 0, "layers": len(result.layers)},
    )
