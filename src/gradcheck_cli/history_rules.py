"""The rules over training time: one recorded step judged by ``inspect``'s rules and against the records
before it. ``watch`` applies them live (``on_problem``) and ``gradcheck history`` again from the log, so
both always agree.

Over time one more thing can go wrong than in a single pass: the whole gradient grows. A record whose
total norm ‖∂L/∂θ‖ exceeds ``SPIKE`` × the median of the last ``WINDOW`` healthy records before it (at
least ``MIN_REFERENCE`` of them) is a spike (GC016). The calibration of ``SPIKE`` is in docs/calibration.md
(healthy training runs of GPT-2, an MLP, a CNN and an LSTM, every step recorded).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from gradcheck_cli.loss import LossChoice
from gradcheck_cli.probe import LayerMeasure, Norm, ProbeResult
from gradcheck_cli.report import Finding, Problem, Severity
from gradcheck_cli.rule_codes import NON_FINITE_GRADIENT, TRAINING_LOSS_NON_FINITE, TRAINING_SPIKE
from gradcheck_cli.rules import Diagnosis, Thresholds, diagnose
from gradcheck_cli.watch_hooks import StepLog

SPIKE = 10.0
"""A record's total gradient norm this many times the healthy median before it is a spike."""
MIN_REFERENCE = 3
"""Records needed before a median is trusted as the healthy reference."""
WINDOW = 10
"""The reference is the median of the last this-many healthy records: gradient norms drift while a model
learns (a classifier's grow 30× in 60 steps), and an old median would make that drift look like a spike."""
STOPPING = frozenset({Problem.NON_FINITE, Problem.EXPLODING})
"""The problems that ``on_problem='raise'``/``'stop'`` act on."""

TRAINING_LOSS = LossChoice("training", "the training loop's own loss")


@dataclass(frozen=True)
class Assessment:
    """One recorded step, judged."""

    step: int
    diagnosis: Diagnosis
    findings: tuple[Finding, ...]
    total_norm: float
    reference: float | None
    """Median total norm of the healthy records before this one (None: fewer than ``MIN_REFERENCE``)."""

    @property
    def problems(self) -> tuple[Problem, ...]:
        found = {f.problem for f in self.findings if f.severity is Severity.ERROR and f.problem}
        return tuple(p for p in Problem if p in found)


def probe_result(log: StepLog) -> ProbeResult:
    """The record as ``inspect``'s raw measurements, so the same rules apply to it."""
    layers = tuple(
        LayerMeasure(
            name=layer.name,
            type=layer.type,
            params=layer.params,
            frozen=layer.frozen,
            weight_norm=layer.weight_norm,
            grad=None if layer.grad is None else Norm(*layer.grad),
            calls=tuple(None if c is None else Norm(*c) for c in layer.calls),
        )
        for layer in log.layers
    )
    seen = [0] * len(layers)
    order = []
    for index in log.order:
        order.append((index, seen[index]))
        seen[index] += 1
    output_finite = log.output_max is None or math.isfinite(log.output_max)
    loss = log.loss if log.loss is not None else (0.0 if output_finite else math.nan)
    return ProbeResult(
        layers=layers,
        call_order=tuple(order),
        activation_hooks=log.activation_hooks and bool(log.order),
        loss=TRAINING_LOSS,
        loss_value=loss,
        mode="train",
        output_finite=output_finite,
    )


def assess(
    log: StepLog,
    healthy_norms: Sequence[float],
    *,
    scaler: bool = False,
    thresholds: Thresholds | None = None,
) -> Assessment:
    """Apply ``inspect``'s rules to the record, then the rules over time against the healthy records before it."""
    diagnosis = diagnose(probe_result(log), thresholds)
    findings = list(diagnosis.findings)
    if scaler:
        findings = [_handled_overflow(f, log) for f in findings]
    total = log.total_norm
    recent = list(healthy_norms)[-WINDOW:]
    reference = statistics.median(recent) if len(recent) >= MIN_REFERENCE else None
    if reference is not None and reference > 0 and math.isfinite(total) and total > SPIKE * reference:
        findings.append(
            Finding(
                TRAINING_SPIKE.code,
                TRAINING_SPIKE.name,
                Severity.ERROR,
                Problem.EXPLODING,
                _largest_layer(log),
                f"step {log.step}: the total gradient norm is {total:.3g}, {total / reference:.3g}× the median "
                f"{reference:.3g} of the last {len(recent)} healthy records before it",
                {"step": log.step, "total_norm": total, "reference": reference, "ratio": total / reference},
            )
        )
    if log.loss_non_finite_step is not None:
        findings.append(
            Finding(
                TRAINING_LOSS_NON_FINITE.code,
                TRAINING_LOSS_NON_FINITE.name,
                Severity.ERROR,
                Problem.NON_FINITE,
                None,
                f"the loss became NaN/Inf at step {log.loss_non_finite_step}",
                {"step": log.loss_non_finite_step},
            )
        )
    if log.first_non_finite is not None:
        findings = [_with_origin(f, log) for f in findings]
    return Assessment(log.step, diagnosis, tuple(findings), total, reference)


def healthy(assessment: Assessment) -> bool:
    """Whether a record may serve as the reference for later ones."""
    return not assessment.problems and math.isfinite(assessment.total_norm)


def _largest_layer(log: StepLog) -> str | None:
    best = max((layer for layer in log.layers if layer.grad is not None), key=lambda la: la.grad[0] if la.grad else 0.0, default=None)
    return None if best is None else best.name


def _handled_overflow(finding: Finding, log: StepLog) -> Finding:
    """Under a GradScaler, NaN/Inf gradients with a finite loss are its overflow check at work: the step
    is skipped and the scale lowered. Information, not a problem."""
    if finding.code != NON_FINITE_GRADIENT.code or log.loss is None or not math.isfinite(log.loss):
        return finding
    scale = f" (scale {log.scale:g})" if log.scale else ""
    return Finding(
        finding.code,
        finding.name,
        Severity.INFO,
        None,
        finding.layer,
        f"step {log.step}: {finding.message}; the loss is finite, so this is the GradScaler's overflow{scale}: "
        "it skips the step and lowers the scale",
        finding.evidence,
    )


def _with_origin(finding: Finding, log: StepLog) -> Finding:
    if finding.problem is not Problem.NON_FINITE:
        return finding
    where = {"forward": "its output", "backward": "its output gradient", "parameter": "its parameter gradient"}
    stage = where.get(log.first_non_finite_stage or "", "it")
    message = f"{finding.message}; NaN/Inf appeared first in {log.first_non_finite} ({stage})"
    evidence = {**finding.evidence, "first_module": log.first_non_finite, "first_stage": log.first_non_finite_stage}
    return Finding(finding.code, finding.name, finding.severity, finding.problem, finding.layer, message, evidence)
