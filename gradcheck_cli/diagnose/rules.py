"""Diagnosis: from raw probe measurements to per-layer stats, the path summary and findings.

The signal is the activation gradient ‖∂L/∂h‖ followed along the forward calls: the ratio of
the gradient at the input end to that at the output end (the attenuation) and its per-layer
geometric mean (the gain, the seed's σ'(z)·w factor). Healthy real architectures stay within
about ±1.5 orders of magnitude (docs/calibration.md); known pathologies go far beyond.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradcheck_cli.diagnose.gain import stretch_gain
from gradcheck_cli.diagnose.module_kinds import GATED_RECURRENT, RECURRENT
from gradcheck_cli.diagnose.paths import Path, Step, follow
from gradcheck_cli.diagnose.program_signal import program_finding, program_measured_with, program_route
from gradcheck_cli.diagnose.reach import no_gradient as _no_gradient
from gradcheck_cli.diagnose.reach import zero_everywhere as _zero_everywhere
from gradcheck_cli.diagnose.rule_codes import (
    DEAD_UNITS,
    EXPLODING,
    EXPLODING_THROUGH_TIME,
    FP16_OVERFLOW,
    FP16_UNDERFLOW,
    INIT_SCALE,
    NO_GRADIENT,
    NON_FINITE_FORWARD,
    NON_FINITE_GRADIENT,
    PARAMETER_GRADIENTS_ONLY,
    RULES,
    SATURATED_ACTIVATION,
    UNSTABLE_OPTIMISATION,
    UNUSED_LAYER,
    VANISHING,
    VANISHING_THROUGH_TIME,
    Rule,
)
from gradcheck_cli.probe.results import LayerMeasure, Norm, ProbeResult
from gradcheck_cli.report.report import Finding, LayerStats, PathSummary, Problem, Severity

__all__ = [  # the rule codes are re-exported: callers import them from here
    "DEAD_UNITS",
    "EXPLODING",
    "EXPLODING_THROUGH_TIME",
    "FP16_OVERFLOW",
    "FP16_UNDERFLOW",
    "INIT_SCALE",
    "NON_FINITE_FORWARD",
    "NON_FINITE_GRADIENT",
    "NO_GRADIENT",
    "PARAMETER_GRADIENTS_ONLY",
    "RULES",
    "SATURATED_ACTIVATION",
    "UNSTABLE_OPTIMISATION",
    "UNUSED_LAYER",
    "VANISHING",
    "VANISHING_THROUGH_TIME",
    "Diagnosis",
    "Rule",
    "Thresholds",
    "diagnose",
]


@dataclass(frozen=True)
class Thresholds:
    """Where a path attenuation stops being healthy (calibration: docs/calibration.md)."""

    vanishing: float = 1e-3
    """Flag ``vanishing`` when input-end / output-end gradient is below this."""
    exploding: float = 1e3
    """Flag ``exploding`` when input-end / output-end gradient is above this."""

    def as_dict(self) -> dict[str, float]:
        """The thresholds as the report's ``thresholds`` object."""
        return {"vanishing_attenuation": self.vanishing, "exploding_attenuation": self.exploding}


RECURRENT_CELLS = RECURRENT
GATED_UNLEARNABLE = 1e-10
"""A gated cell (LSTM, GRU) whose gradient reaching the first time step is below this share of the last step's
cannot learn from the first steps: an error. Calibrated on trainability (docs/calibration.md, "Gated cells"): on a
recall-the-first-token task, at default init, every run below 1e-10 failed to learn (23 of 23, LSTM and GRU,
hidden 32-256, T 50-400, up to 10 000 Adam steps), every run at 1e-4 or above learned (20 of 20); between, it
depends on the cell and the seed (a warning)."""
GATED_NOTE = (
    " (a warning, not an error: above 1e-10 gated cells can still learn to open their forget/update gates; "
    "it limits how far back credit reaches until they do)"
)
UNLEARNABLE_NOTE = (
    " (an error although the cell is gated: below 1e-10 of the last step's, LSTM and GRU cells at this point "
    "failed to learn a dependency on the first steps in every calibration run)"
)


def _gated_severity(cell_type: str, gated: bool, ratio: float) -> tuple[Severity, str]:
    """Vanishing through time: an error for plain cells and for gated cells below :data:`GATED_UNLEARNABLE`, a
    warning for gated cells above it; and the note that says which."""
    if not gated or cell_type not in GATED_RECURRENT:
        return Severity.ERROR, ""
    if ratio < GATED_UNLEARNABLE:
        return Severity.ERROR, UNLEARNABLE_NOTE
    return Severity.WARNING, GATED_NOTE


@dataclass(frozen=True)
class Diagnosis:
    """What the rules concluded: per-layer stats, the path summary and the findings."""

    layers: tuple[LayerStats, ...]
    path: PathSummary
    findings: tuple[Finding, ...]


def diagnose(result: ProbeResult, thresholds: Thresholds | None = None) -> Diagnosis:
    """Apply every rule to one probe's measurements."""
    limits = thresholds or Thresholds()
    route = (
        follow(result, (limits.vanishing, limits.exploding))
        if result.activation_hooks
        else program_route(result, (limits.vanishing, limits.exploding))
    )
    path = _summarise(route, result)

    findings: list[Finding] = []
    findings += _non_finite(result)
    finite_run = not any(f.problem is Problem.NON_FINITE for f in findings)
    flagged: dict[int, str] = {}
    if finite_run and path.attenuation is not None:
        findings += _attenuation(route, path, limits, result, flagged)
    if finite_run:
        findings += _zero_everywhere(result, flagged)
        findings += _through_time(result, limits, flagged)
    findings += _no_gradient(result, flagged)
    if not result.activation_hooks:
        findings.append(program_finding(result))
    # never called and no gradient: nn.MultiheadAttention's out_proj is used without being called
    unused = [m.name for m in result.layers if not m.calls and m.grad is None and result.activation_hooks]
    if unused:
        findings.append(
            Finding(
                UNUSED_LAYER.code,
                UNUSED_LAYER.name,
                Severity.INFO,
                None,
                unused[0],
                f"{len(unused)} module(s) with parameters never ran in the forward pass (first: {unused[0]})",
                {"layers": unused},
            )
        )
    first_call: dict[int, int] = {}
    for position, (layer, _) in enumerate(result.call_order):
        first_call.setdefault(layer, position)
    refs, depths = dict(route.layer_ref), dict(route.layer_depth)
    layers = tuple(
        _layer_stats(m, first_call.get(i, -1), result.activation_hooks, refs.get(i), flagged.get(i), depths.get(i))
        for i, m in enumerate(result.layers)
    )
    return Diagnosis(layers=layers, path=path, findings=tuple(findings))


def _summarise(route: Path, result: ProbeResult) -> PathSummary:
    measured_with = "activation_gradients" if result.activation_hooks else program_measured_with(result)
    points = route.points
    ends = tuple(result.layers[i].name for i in route.ends) if route.from_graph else ()
    if len(points) < 2 or route.out_end is None:
        return PathSummary(measured_with, len(points), None, None, output_ends=ends)
    first, last = points[0], points[-1]
    return PathSummary(
        measured_with=measured_with,
        length=len(points),
        attenuation=_ratio(first.value, route.out_end),
        gain=_gain(points, route.out_end),
        first_layer=result.layers[first.layer].name,
        last_layer=result.layers[last.layer].name,
        output_ends=ends,
    )


def _ratio(a: float, b: float) -> float | None:
    """a / b; inf when ``a`` overflowed float32 (a finite gradient too large to take its norm)."""
    if math.isnan(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def _gain(points: Sequence[Step], out_end: float) -> float | None:
    """Geometric-mean factor per step over the stretch where the gradient is non-zero."""
    if not math.isfinite(out_end) or out_end == 0:
        return None
    return stretch_gain([p.value / out_end for p in reversed(points[:-1])])


def _attenuation(
    route: Path, path: PathSummary, limits: Thresholds, result: ProbeResult, flagged: dict[int, str]
) -> list[Finding]:
    assert path.attenuation is not None and route.out_end is not None
    points, out_end = list(route.points), route.out_end
    names = [result.layers[p.layer].name for p in points]
    evidence = {
        "attenuation": path.attenuation,
        "gain": path.gain,
        "path_length": path.length,
        "first_layer": path.first_layer,
        "last_layer": path.last_layer,
    }
    if path.attenuation < limits.vanishing:
        crossing = _first_crossing(points, lambda v: v < limits.vanishing * out_end)
        cell = result.layers[points[crossing].layer]
        severity, note = _gated_severity(cell.type, len(cell.calls) > 1, path.attenuation)
        for layer, rel in route.rel or tuple((p.layer, p.value / out_end) for p in points):
            if rel < limits.vanishing and severity is Severity.ERROR:
                flagged.setdefault(layer, Problem.VANISHING.value)
        underflow = sum(1 for p in points if p.value == 0)
        detail = f"; it underflowed to exactly 0 in {underflow} of {len(points)} calls" if underflow else ""
        return [
            Finding(
                VANISHING.code,
                VANISHING.name,
                severity,
                Problem.VANISHING,
                names[crossing],
                f"the gradient at the input end ({path.first_layer}) is {_fmt(path.attenuation)} of that at the "
                f"output {_output_end(path)} over {path.length} calls, {_fmt(path.gain)} per call; it falls below "
                f"{_fmt(limits.vanishing)} of the output's at layer {names[crossing]}{detail}{note}",
                {**evidence, "underflowed_calls": underflow, "recurrent": _recurrent_type(cell)},
            )
        ]
    if path.attenuation > limits.exploding:
        crossing = _first_crossing(points, lambda v: v > limits.exploding * out_end)
        for layer, rel in route.rel or tuple((p.layer, p.value / out_end) for p in points):
            if rel > limits.exploding:
                flagged.setdefault(layer, Problem.EXPLODING.value)
        return [
            Finding(
                EXPLODING.code,
                EXPLODING.name,
                Severity.ERROR,
                Problem.EXPLODING,
                names[crossing],
                f"the gradient grows {_fmt(path.attenuation)}× from the output {_output_end(path)} to the input end "
                f"({path.first_layer}) over {path.length} calls, {_fmt(path.gain)} per call; it exceeds "
                f"{_fmt(limits.exploding)}× the output's from layer {names[crossing]} inwards",
                {**evidence, "recurrent": _recurrent_type(result.layers[points[crossing].layer])},
            )
        ]
    return []


def _output_end(path: PathSummary) -> str:
    """The output end in words: one layer, or several parallel ones nearest the loss whose gradients pool."""
    ends = path.output_ends
    if len(ends) > 1:
        more = " …" if len(ends) > 3 else ""
        return f"({', '.join(ends[:3])}{more}: {len(ends)} output ends nearest the loss, pooled)"
    return f"({path.last_layer})"


def _recurrent_type(measure: LayerMeasure) -> str | None:
    """The recurrent module type when the gradient is followed through time in it, else None."""
    if measure.type in RECURRENT_CELLS and len(measure.calls) > 1:
        return measure.type
    if measure.time_profile:
        return measure.type
    return None


def _through_time(result: ProbeResult, limits: Thresholds, flagged: dict[int, str]) -> list[Finding]:
    """Fused RNN/LSTM/GRU modules: the gradient reaching the first time step's input vs the last's."""
    findings = []
    for index, measure in enumerate(result.layers):
        profile = measure.time_profile
        if len(profile) < 2 or not all(math.isfinite(v) for v in profile):
            continue
        ratio = _ratio(profile[0], profile[-1])
        if ratio is None:
            continue
        steps = len(profile)
        gain = stretch_gain([v / profile[-1] for v in reversed(profile[:-1])])
        # steps back from the last before the gradient underflowed to exactly 0 (None: it never did)
        reach = next((k for k, v in enumerate(reversed(profile)) if v == 0), None)
        evidence: dict[str, object] = {"attenuation": ratio, "gain": gain, "steps": steps, "recurrent": measure.type}
        if reach is not None:
            evidence["underflow_steps_back"] = reach
        if ratio < limits.vanishing:
            severity, note = _gated_severity(measure.type, True, ratio)
            if severity is Severity.ERROR:
                flagged.setdefault(index, Problem.VANISHING.value)
            lost = (
                f"; every element is exactly 0 (underflowed) from {reach} steps back, so the first {steps - reach} "
                "steps get no gradient at all and cannot be learned from"
                if reach is not None
                else ""
            )
            findings.append(
                Finding(
                    VANISHING_THROUGH_TIME.code,
                    VANISHING_THROUGH_TIME.name,
                    severity,
                    Problem.VANISHING,
                    measure.name,
                    f"in {measure.name} ({measure.type}) the gradient reaching the first time step is "
                    f"{_fmt(ratio)} of that at the last, over {steps} steps ({_fmt(gain)} per step){lost}{note}",
                    evidence,
                )
            )
        elif ratio > limits.exploding:
            flagged.setdefault(index, Problem.EXPLODING.value)
            findings.append(
                Finding(
                    EXPLODING_THROUGH_TIME.code,
                    EXPLODING_THROUGH_TIME.name,
                    Severity.ERROR,
                    Problem.EXPLODING,
                    measure.name,
                    f"in {measure.name} ({measure.type}) the gradient reaching the first time step is "
                    f"{_fmt(ratio)}× that at the last, over {steps} steps ({_fmt(gain)} per step)",
                    evidence,
                )
            )
    return findings


def _first_crossing(points: list[Step], crossed: Callable[[float], bool]) -> int:
    """Index of the call nearest the output, going backwards, from which the condition holds."""
    index = len(points) - 1
    while index > 0 and not crossed(points[index].value):
        index -= 1
    return index


def _non_finite(result: ProbeResult) -> list[Finding]:
    findings = []
    bad_weights = [m.name for m in result.layers if not math.isfinite(m.weight_norm)]
    if not math.isfinite(result.loss_value) or not result.output_finite:
        where = f"; weights of {len(bad_weights)} layer(s) are NaN/Inf (first: {bad_weights[0]})" if bad_weights else ""
        findings.append(
            Finding(
                NON_FINITE_FORWARD.code,
                NON_FINITE_FORWARD.name,
                Severity.ERROR,
                Problem.NON_FINITE,
                bad_weights[0] if bad_weights else None,
                f"the forward pass produced NaN/Inf (loss = {result.loss_value}){where}",
                {"loss": result.loss_value, "non_finite_weights": bad_weights},
            )
        )
    bad = [m for m in result.layers if not _all_finite(m)]
    if bad:
        findings.append(
            Finding(
                NON_FINITE_GRADIENT.code,
                NON_FINITE_GRADIENT.name,
                Severity.ERROR,
                Problem.NON_FINITE,
                bad[0].name,
                f"{len(bad)} of {len(result.layers)} layers have NaN/Inf gradients "
                f"(first in forward order: {bad[0].name})",
                {"layers": [m.name for m in bad], "non_finite_weights": bad_weights},
            )
        )
    return findings


def _all_finite(measure: LayerMeasure) -> bool:
    norms: list[Norm | None] = [measure.grad, *measure.calls]
    return all(n.finite for n in norms if n is not None)


def _layer_stats(
    measure: LayerMeasure, position: int, hooks: bool, out_end: float | None, flag: str | None, depth: int | None
) -> LayerStats:
    call_norms = tuple(math.nan if c is None else c.l2 for c in measure.calls)
    measured = [c for c in measure.calls if c is not None]
    act = math.sqrt(sum(c.l2 * c.l2 for c in measured)) if measured else None
    flags = []
    if not _all_finite(measure) or not math.isfinite(measure.weight_norm):
        flags.append(Problem.NON_FINITE.value)
    if flag is not None:
        flags.append(flag)
    reference = None
    if act is not None and out_end:
        reference = act / out_end if math.isfinite(out_end) else None
    return LayerStats(
        name=measure.name,
        type=measure.type,
        position=position,
        calls=len(measure.calls),
        params=measure.params,
        frozen=measure.frozen,
        weight_norm=measure.weight_norm,
        grad_norm=None if measure.grad is None else measure.grad.l2,
        act_grad_norm=act,
        act_grad_norms=call_norms if hooks else (),
        act_grad_rel=reference,
        time_grad_norms=measure.time_profile,
        flags=tuple(flags),
        depth=depth,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
