"""The rules over training time: one recorded step judged by ``inspect``'s rules and against the records
before it. ``watch`` applies them live (``on_problem``) and ``gradcheck history`` again from the log, so
both always agree.

Over time two more things can go wrong than in a single pass. The whole gradient grows: a record whose
total norm ‖∂L/∂θ‖ exceeds ``SPIKE`` × the median of the last ``WINDOW`` healthy records before it (at
least ``MIN_REFERENCE`` of them) and above every healthy record so far is a spike (GC016): near convergence
gradients shrink and turn spiky (a few samples still misclassified), and a spike back within the range
the run already went through is not an explosion. Or the run diverges without any gradient growing
(Adam normalises its steps, so a learning rate far too large sends the loss back up while the
gradients stay ordinary): a loss above ``LOSS_RISE`` × the healthy median for ``PERSIST`` records in a
row is a divergence (GC018), dated from the first of them. The calibration of ``SPIKE`` is in docs/calibration.md
(healthy training runs of GPT-2, an MLP, a CNN and an LSTM, every step recorded).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradcheck_cli.diagnose.rule_codes import (
    NO_GRADIENT,
    NON_FINITE_GRADIENT,
    PARAMETER_GRADIENTS_ONLY,
    TRAINING_LOSS_DIVERGENCE,
    TRAINING_LOSS_NON_FINITE,
    TRAINING_SPIKE,
)
from gradcheck_cli.diagnose.rules import Diagnosis, Thresholds, diagnose
from gradcheck_cli.probe.results import LayerMeasure, ProbeResult
from gradcheck_cli.report.report import Finding, Problem, Severity
from gradcheck_cli.training.log import StepLog

SPIKE = 10.0
"""A record's total gradient norm this many times the healthy median before it is a spike."""
MIN_REFERENCE = 3
"""Records needed before a median is trusted as the healthy reference."""
WINDOW = 10
"""The reference is the median of the last this-many healthy records: gradient norms drift while a model
learns (a classifier's grow 30× in 60 steps), and an old median would make that drift look like a spike."""
PEAK = 2.0
"""…and this many times the largest healthy record so far."""
LOSS_RISE = 2.0
"""A record's loss this many times the healthy median starts a possible divergence."""
REGAINED = 0.5
"""…having lost at least this share of the progress made since the first record."""
PERSIST = 3
"""Records in a row above ``LOSS_RISE`` that make it one (one noisy batch does not)."""
STOPPING = frozenset({Problem.NON_FINITE, Problem.EXPLODING})
"""The problems that ``on_problem='raise'``/``'stop'`` act on."""


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


@dataclass
class Baseline:
    """What the healthy records so far say is normal; ``advance`` moves it on by one record. Bounded: the last
    ``WINDOW`` norms and losses, the running peak and the first loss."""

    norms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    losses: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    peak: float = 0.0
    """The largest total norm of a healthy record so far."""
    first_loss: float | None = None
    rising: list[int] = field(default_factory=list)
    """Steps of the records just before this one whose loss was above ``LOSS_RISE`` × the median."""
    overflows: int = 0
    """Records in a row, up to the last one, whose NaN/Inf gradients a GradScaler skipped."""

    def reference_norm(self) -> float | None:
        return statistics.median(self.norms) if len(self.norms) >= MIN_REFERENCE else None

    def reference_loss(self) -> float | None:
        return statistics.median(self.losses) if len(self.losses) >= MIN_REFERENCE else None


def loss_risen(log: StepLog, baseline: Baseline) -> bool:
    """Above ``LOSS_RISE`` × the healthy median, and back up at least ``REGAINED`` of the way to the
    first record's loss: a loss near 0 that doubles (1e-6 → 3e-6) has not diverged."""
    reference = baseline.reference_loss()
    loss = log.loss
    if reference is None or reference <= 0 or loss is None or not math.isfinite(loss):
        return False
    first = baseline.first_loss if baseline.first_loss is not None else reference
    regained = first <= reference or loss - reference >= REGAINED * (first - reference)
    return loss > LOSS_RISE * reference and regained


def advance(baseline: Baseline, log: StepLog, assessment: Assessment) -> None:
    """Count the record into the baseline when it was healthy; keep the run of risen losses."""
    baseline.overflows = baseline.overflows + 1 if overflowed(assessment.findings) else 0
    risen = loss_risen(log, baseline)
    baseline.rising = [*baseline.rising, log.step] if risen else []
    # a vanishing record still counts: a run that vanishes throughout must still be able to spike or diverge
    calm = not (set(assessment.problems) & STOPPING) and math.isfinite(assessment.total_norm)
    if calm and not risen:
        baseline.norms.append(assessment.total_norm)
        baseline.peak = max(baseline.peak, assessment.total_norm)
        if log.loss is not None and math.isfinite(log.loss):
            baseline.losses.append(log.loss)
            if baseline.first_loss is None:
                baseline.first_loss = log.loss


def trained_layers(measure: ProbeResult) -> ProbeResult:
    """The measurements without the frozen layers that no gradient reached: in a training loop that is by
    design (a frozen embedding or backbone below the trained layers), where ``inspect`` unfreezes them."""
    kept = [i for i, layer in enumerate(measure.layers) if not _frozen_and_dark(layer)]
    if len(kept) == len(measure.layers):
        return measure
    new_index = {old: new for new, old in enumerate(kept)}
    order = tuple((new_index[layer], call) for layer, call in measure.call_order if layer in new_index)
    return dataclasses.replace(measure, layers=tuple(measure.layers[i] for i in kept), call_order=order)


def _frozen_and_dark(layer: LayerMeasure) -> bool:
    return layer.frozen and layer.grad is None and all(c is None for c in layer.calls)


def assess(
    log: StepLog,
    baseline: Baseline,
    *,
    scaler: bool = False,
    thresholds: Thresholds | None = None,
) -> Assessment:
    """Apply ``inspect``'s rules to the record, then the rules over time against the healthy records before it."""
    diagnosis = diagnose(trained_layers(log.measure), thresholds)
    findings = [_watched_wording(f) for f in diagnosis.findings]
    if all(layer.grad is None and all(c is None for c in layer.calls) for layer in log.layers):
        findings = [_no_gradient(log)]
    if scaler:
        findings = [_handled_overflow(f, log) for f in findings]
        if overflowed(findings) and (baseline.overflows + 1 >= PERSIST or (log.scale is not None and log.scale < 1)):
            findings.append(_lasting_overflow(log, baseline.overflows + 1))
    findings += [f for f in (_spike(log, baseline), _divergence(log, baseline), _non_finite_loss(log)) if f]
    if log.first_non_finite is not None:
        findings = [_with_origin(f, log) for f in findings]
    return Assessment(log.step, diagnosis, tuple(findings), log.total_norm, baseline.reference_norm())


def _no_gradient(log: StepLog) -> Finding:
    return Finding(
        NO_GRADIENT.code,
        NO_GRADIENT.name,
        Severity.WARNING,
        None,
        None,
        f"step {log.step}: no gradient reached the model since the previous step(); call w.step() after "
        "loss.backward() and before optimizer.zero_grad()",
        {"step": log.step},
    )


def _spike(log: StepLog, baseline: Baseline) -> Finding | None:
    """GC016: the total norm above ``SPIKE`` × the healthy median and ``PEAK`` × the largest healthy record."""
    total = log.total_norm
    reference = baseline.reference_norm()
    peak = baseline.peak
    if reference is None or reference <= 0 or not math.isfinite(total) or total <= max(SPIKE * reference, PEAK * peak):
        return None
    return Finding(
        TRAINING_SPIKE.code,
        TRAINING_SPIKE.name,
        Severity.ERROR,
        Problem.EXPLODING,
        _largest_layer(log),
        f"step {log.step}: the total gradient norm is {total:.3g}, {total / reference:.3g}× the median "
        f"{reference:.3g} of the last {len(baseline.norms)} healthy records before it and above the largest healthy "
        f"one so far ({peak:.3g})",
        {"step": log.step, "total_norm": total, "reference": reference, "ratio": total / reference, "peak": peak},
    )


def _divergence(log: StepLog, baseline: Baseline) -> Finding | None:
    """GC018: the loss above ``LOSS_RISE`` × the healthy median for ``PERSIST`` records in a row."""
    if not (loss_risen(log, baseline) and len(baseline.rising) + 1 >= PERSIST):
        return None
    median = baseline.reference_loss() or 0.0
    loss = log.loss if log.loss is not None else math.nan
    start = baseline.rising[0] if baseline.rising else log.step
    return Finding(
        TRAINING_LOSS_DIVERGENCE.code,
        TRAINING_LOSS_DIVERGENCE.name,
        Severity.ERROR,
        Problem.EXPLODING,
        None,
        f"step {log.step}: the loss is {loss:.4g}, {loss / median:.3g}× the median {median:.4g} of the "
        f"last healthy records, above {LOSS_RISE:g}× since step {start} ({len(baseline.rising) + 1} records "
        "in a row): the run is diverging",
        {"step": log.step, "loss": loss, "reference_loss": median, "from_step": start},
    )


def _non_finite_loss(log: StepLog) -> Finding | None:
    if log.loss_non_finite_step is None:
        return None
    return Finding(
        TRAINING_LOSS_NON_FINITE.code,
        TRAINING_LOSS_NON_FINITE.name,
        Severity.ERROR,
        Problem.NON_FINITE,
        None,
        f"the loss was NaN/Inf at step {log.loss_non_finite_step} (the first such step since the record before)",
        {"step": log.loss_non_finite_step},
    )


def healthy(assessment: Assessment) -> bool:
    """Whether a record may serve as the reference for later ones."""
    return not assessment.problems and math.isfinite(assessment.total_norm)


def _largest_layer(log: StepLog) -> str | None:
    best = max(
        (layer for layer in log.layers if layer.grad is not None),
        key=lambda la: la.grad.l2 if la.grad else 0.0,
        default=None,
    )
    return None if best is None else best.name


def _watched_wording(finding: Finding) -> Finding:
    """GC006 as a watch sees it: hooks are off for a torch.compile'd model, not only for TorchScript."""
    if finding.code != PARAMETER_GRADIENTS_ONLY.code:
        return finding
    return Finding(
        finding.code,
        finding.name,
        finding.severity,
        finding.problem,
        finding.layer,
        "activation gradients were not recorded (a torch.compile'd model, or one whose module hooks cannot fire), "
        "so the path is followed through ‖∂L/∂W‖/‖W‖ per layer; deep ReLU or linear stacks can hide vanishing there",
        finding.evidence,
    )


def overflowed(findings: Sequence[Finding]) -> bool:
    """Whether a GradScaler skipped this record's step (its NaN/Inf gradients read as information)."""
    return any(f.code == NON_FINITE_GRADIENT.code and f.severity is Severity.INFO for f in findings)


def _lasting_overflow(log: StepLog, records: int) -> Finding:
    """A GradScaler that keeps skipping: the gradients overflow whatever the scale, and nothing trains."""
    scale = f"{log.scale:g}" if log.scale is not None else "unknown"
    return Finding(
        NON_FINITE_GRADIENT.code,
        NON_FINITE_GRADIENT.name,
        Severity.ERROR,
        Problem.NON_FINITE,
        log.first_non_finite,
        f"step {log.step}: the GradScaler skipped {records} recorded step(s) in a row and its scale is {scale}: "
        "the gradients are NaN/Inf whatever the scale, so the optimiser is not stepping",
        {"step": log.step, "skipped_records": records, "scale": log.scale},
    )


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
