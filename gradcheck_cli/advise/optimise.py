"""The optimisation probe: N optimiser steps on the sample batch, on a copy of the model.

One probe shows the gradient at one point of weight space. Training moves the weights, and with
them the per-layer factor σ'(z)·w: a learning rate that is too large can drive it away from 1
within a few steps — the gradient blows up, or units saturate or die and it collapses. This module
deep-copies the model, probes the copy, steps an optimiser with the gradients that probe left, and
repeats, recording the loss, the total gradient norm, the path attenuation and gain and every
layer's ‖∂L/∂W‖. The state after the last step is probed too: ``steps=N`` gives N + 1 records
(steps 0 … N), fewer when the run stops at the first NaN/Inf.

The verdict compares every record with step 0 (the band is 1e-3 … 1e3 of step 0's value):

- ``non_finite``: the loss, the output or a gradient became NaN/Inf (or the total norm overflowed);
  the run stops there and ``onset_step`` is that step.
- ``exploding``: the total gradient norm rose above ``GROWTH_LIMIT`` (1e3) × step 0's, or the path
  attenuation rose above 1e3 × step 0's, or it crossed ``Thresholds.exploding`` having been below it
  at step 0 and having grown at least ``CROSSING_MARGIN`` (10×); or the norm was still growing
  geometrically when the run ended (≥ 2× at each of the last ≥ 5 steps and ≥ 100× over them).
- ``collapsing``: the total gradient norm fell below ``COLLAPSE_LIMIT`` (1e-3) × step 0's, or the
  attenuation fell below 1e-3 × step 0's, or it crossed ``Thresholds.vanishing`` having been above it
  at step 0 and having fallen at least 10× — each only at steps where the loss has *not* converged.
  A loss at or below ``CONVERGED_LOSS`` (1 %) of step 0's (in absolute value) means the model fitted
  the batch, and its gradient is small because there is little left to learn.
- ``stable`` otherwise.

A departure counts only when it lasts ``PERSIST`` (3) consecutive records, or lasts until the run
ends: a 1–2 step spike that returns into the band is noise, a run that *ends* outside the band was
still outside when training stopped. ``onset_step`` is the first step of that stretch (for geometric
growth, the first step that grew). When both an explosion and a collapse happen, the earlier
decides the verdict; the finding mentions the later one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradcheck_cli.advise.surrogate import bounded_batch
from gradcheck_cli.diagnose.rule_codes import NON_FINITE_FORWARD, NON_FINITE_GRADIENT, UNSTABLE_OPTIMISATION
from gradcheck_cli.diagnose.rules import Thresholds, diagnose
from gradcheck_cli.errors import GradcheckError, first_line
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.model_copy import copy_model
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.report.report import Finding, Problem, Severity
from gradcheck_cli.report.sections import OptimisationTrace, StepRecord
from gradcheck_cli.settings import Optimizer, ProbeOptions, ProbeSettings, probe_settings

if TYPE_CHECKING:
    from typing_extensions import Unpack

MAX_STEPS = 10_000

GROWTH_LIMIT = 1e3
"""Exploding: the total gradient norm (or the attenuation) above this multiple of step 0's."""
LOSS_GROWTH = 10.0
"""Exploding also when the loss exceeds this multiple of step 0's while the gradient norm has grown ≥ 10×."""
COLLAPSE_LIMIT = 1e-3
"""Collapsing: the total gradient norm (or the attenuation) below this fraction of step 0's."""
CROSSING_MARGIN = 10.0
"""An attenuation crossing ``Thresholds`` counts once it also moved this factor away from step 0's."""
CONVERGED_LOSS = 1e-2
"""|loss| at or below this fraction of step 0's: the batch is fitted, a small gradient is expected."""
PERSIST = 3
"""Records a departure must last (or last until the run ends) to count: shorter spikes are noise."""
GEOMETRIC_STEPS = 5
"""Geometric growth: at least this many consecutive steps, each ≥ ``GEOMETRIC_FACTOR`` × the one before…"""
GEOMETRIC_FACTOR = 2.0
GEOMETRIC_TOTAL = 100.0
"""…and at least this factor over the whole growth run, which must reach the last record."""

STABLE = "stable"
EXPLODING = "exploding"
COLLAPSING = "collapsing"
NON_FINITE = "non_finite"


def trace_optimisation(
    model: nn.Module, batch: Batch, settings: ProbeSettings | None = None, **options: Unpack[ProbeOptions]
) -> OptimisationTrace:
    """Take ``settings.steps`` optimiser steps on ``batch`` with a deep copy of ``model`` and trace the gradients.

    ``settings`` (:class:`~gradcheck_cli.settings.ProbeSettings`) gives the steps, learning rate, optimiser,
    seed, mode, ``unfreeze`` and thresholds; any of its fields may be given as a keyword instead
    (``trace_optimisation(model, batch, steps=20, lr=0.05)``).

    Every step probes the copy with the same seed (the same dropout masks, the same loss: the batch's target,
    the model's own loss, else a bounded surrogate, :func:`~gradcheck_cli.advise.surrogate.bounded_batch`),
    records what it measured, then steps the optimiser with the gradients the probe left. The state
    after the last step is probed as well, so a finished run has ``steps + 1`` records (0 … N); the
    run stops at the first record whose loss, output or gradient is NaN/Inf. Only the parameters the
    user trains (``requires_grad=True``) are updated — every floating-point one with ``unfreeze``
    when none is. ``model`` itself is never modified: not its weights, gradients, flags, modes nor
    buffers. Memory: one copy of the model plus the optimiser's state (Adam: two more copies).
    """
    settings = probe_settings(settings, options, "trace_optimisation")
    steps, lr = _validate(settings.steps, settings.lr)
    seed, train, unfreeze, limits = settings.seed, settings.train, settings.unfreeze, settings.thresholds
    work = _copy(model)
    batch, loss_words = bounded_batch(work, batch, settings)
    opt = _optimizer(settings.optimizer, _trained_parameters(work, unfreeze), lr)

    layers: tuple[str, ...] = ()
    records: list[StepRecord] = []
    stopped = False
    for step in range(steps + 1):
        result = probe(
            work, batch, seed=seed, train=train, unfreeze=unfreeze, keep_grads=True, loss_output=settings.loss_output
        )
        diagnosis = diagnose(result, limits)
        if step == 0:
            layers = tuple(m.name for m in result.layers)
        norms = tuple(math.nan if m.grad is None else m.grad.l2 for m in result.layers)
        total = math.sqrt(sum(m.grad.l2**2 for m in result.layers if m.grad is not None))
        records.append(
            StepRecord(
                step=step,
                loss=result.loss_value,
                grad_norm=total,
                attenuation=diagnosis.path.attenuation,
                gain=diagnosis.path.gain,
                layer_grad_norms=norms,
            )
        )
        stopped = (
            not result.output_finite
            or not math.isfinite(result.loss_value)
            or not math.isfinite(total)
            or any(m.grad is not None and not m.grad.finite for m in result.layers)
            or any(f.problem is Problem.NON_FINITE for f in diagnosis.findings)
        )
        if stopped or step == steps:
            break
        opt.step()
        for p in work.parameters():  # frozen parameters got gradients for the probe only
            p.grad = None
    del opt, work

    onset: int | None
    if stopped:
        verdict, onset = NON_FINITE, records[-1].step
    else:
        verdict, onset, _ = classify(records, limits)
    return OptimisationTrace(
        optimizer=settings.optimizer.value, lr=lr, layers=layers, steps=tuple(records), verdict=verdict,
        onset_step=onset, loss=loss_words,
    )  # fmt: skip


def _validate(steps: int, lr: float) -> tuple[int, float]:
    """``steps`` and ``lr`` as numbers the loop can use, or the one-line error naming the flag."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= MAX_STEPS:
        raise GradcheckError(f"--steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise GradcheckError(f"--lr must be a positive finite number such as 0.01, got {lr!r}")
    return int(steps), float(lr)


def _copy(model: nn.Module) -> nn.Module:
    """An independent copy of ``model``; TorchScript modules go through save/load (their deepcopy clones
    parameters into non-leaf tensors that no optimiser accepts)."""
    try:
        work = copy_model(model)
    except Exception as exc:  # user modules can hold anything (locks, open files, generators)
        raise GradcheckError(
            f"the optimisation probe trains a copy of the model, and copy.deepcopy(model) failed: "
            f"{type(exc).__name__}: {first_line(exc)}; make the model deep-copyable or leave out --steps"
        ) from None
    if not all(p.is_leaf for p in work.parameters()):
        raise GradcheckError(
            "the optimisation probe trains a copy of the model, and the copy's parameters are not leaf tensors "
            "an optimiser can update; leave out --steps for this model"
        )
    return work


def _trained_parameters(model: nn.Module, unfreeze: bool) -> list[nn.Parameter]:
    """The floating-point parameters the user trains; every one when none is and ``unfreeze`` is set."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    trained = [p for p in floating if p.requires_grad]
    return trained or (floating if unfreeze else [])


def _optimizer(kind: Optimizer, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if not params:  # nothing to train: probe() refuses such a model with the message users need
        params = [nn.Parameter(torch.zeros(()))]
    if kind is Optimizer.adam:
        return torch.optim.Adam(params, lr=lr)
    if kind is Optimizer.adamw:
        return torch.optim.AdamW(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


# ------------------------------------------------------------------------------------------ verdict


def classify(records: Sequence[StepRecord], thresholds: Thresholds | None = None) -> tuple[str, int | None, str]:
    """(verdict, onset step, criterion) of a run's records, by the rule in this module's docstring.

    A last record whose loss or total gradient norm is not finite makes the verdict ``non_finite``
    there. The criterion names what decided: ``grad_norm_growth``, ``attenuation_growth``,
    ``attenuation_crossed``, ``geometric_growth``, ``grad_norm_collapse``, ``attenuation_collapse``
    or ``non_finite`` (empty when stable).
    """
    found = _departures(records, thresholds or Thresholds())
    if not found:
        return STABLE, None, ""
    return found[0]


def _departures(records: Sequence[StepRecord], limits: Thresholds) -> list[tuple[str, int | None, str]]:
    """Every verdict other than stable that the records support, earliest onset first."""
    if not records:
        return []
    if not (math.isfinite(records[-1].loss) and math.isfinite(records[-1].grad_norm)):
        return [(NON_FINITE, records[-1].step, NON_FINITE)]
    first = records[0]
    explode = [_explodes(r, first, limits) for r in records]
    collapse = [_collapses(r, first, limits) for r in records]
    found: list[tuple[int, str, str]] = []
    start = _sustained(explode)
    if start is not None:
        found.append((start, EXPLODING, explode[start] or ""))
    growth = _geometric(records)
    if growth is not None and (start is None or growth < start):
        found = [(growth, EXPLODING, "geometric_growth")]
    start = _sustained(collapse)
    if start is not None:
        found.append((start, COLLAPSING, collapse[start] or ""))
    found.sort(key=lambda item: item[0])
    return [(verdict, records[index].step, criterion) for index, verdict, criterion in found]


def _explodes(record: StepRecord, first: StepRecord, limits: Thresholds) -> str | None:
    if _factor(record.grad_norm, first.grad_norm) > GROWTH_LIMIT:
        return "grad_norm_growth"
    att, att0 = record.attenuation, first.attenuation
    diverging = first.loss > 0 and math.isfinite(record.loss) and record.loss > LOSS_GROWTH * first.loss
    if diverging and _factor(record.grad_norm, first.grad_norm) > CROSSING_MARGIN:
        return "loss_growth"  # the loss ran away while the gradient grew: divergence before the norm hits 1e3×
    if att is None or att0 is None:
        return None
    moved = _factor(att, att0)
    if moved > GROWTH_LIMIT:
        return "attenuation_growth"
    if att0 <= limits.exploding < att and moved >= CROSSING_MARGIN:
        return "attenuation_crossed"
    return None


def _collapses(record: StepRecord, first: StepRecord, limits: Thresholds) -> str | None:
    if math.isfinite(first.loss) and abs(record.loss) <= CONVERGED_LOSS * abs(first.loss):
        return None  # the batch is fitted: the gradient may be as small as it likes
    if _factor(record.grad_norm, first.grad_norm) < COLLAPSE_LIMIT:
        return "grad_norm_collapse"
    att, att0 = record.attenuation, first.attenuation
    if att is None or att0 is None:
        return None
    moved = _factor(att, att0)
    if moved < COLLAPSE_LIMIT:
        return "attenuation_collapse"
    if att < limits.vanishing <= att0 and moved <= 1 / CROSSING_MARGIN:
        return "attenuation_crossed"
    return None


def _factor(value: float, reference: float) -> float:
    """value / reference, or NaN (never beyond any limit) when step 0 gives no scale."""
    if not (math.isfinite(reference) and reference > 0) or math.isnan(value):
        return math.nan
    return value / reference


def _sustained(flags: Sequence[str | None]) -> int | None:
    """The first index from which ``flags`` holds ``PERSIST`` times in a row, or until the end."""
    for start in range(len(flags)):
        if all(f is not None for f in flags[start : start + PERSIST]):
            return start
    return None


def _geometric(records: Sequence[StepRecord]) -> int | None:
    """First step of the first growth run: ≥ 2× per step for ≥ 5 steps and ≥ 100× in all.

    Every run is considered, not only one that reaches the last record, so the onset does not move
    with ``--steps`` once the gradient stops growing (saturated units, a run stopped by NaN).
    """
    norms = [r.grad_norm for r in records]
    start = 0
    while start < len(norms) - 1:
        end = start
        while end + 1 < len(norms) and norms[end] > 0 and norms[end + 1] >= GEOMETRIC_FACTOR * norms[end]:
            end += 1
        if end - start >= GEOMETRIC_STEPS and norms[end] >= GEOMETRIC_TOTAL * norms[start]:
            return start + 1  # the first step that grew
        start = max(end, start + 1)
    return None


# ------------------------------------------------------------------------------------------ findings


@dataclass(frozen=True)
class _Change:
    """The layer whose ‖∂L/∂W‖ moved most between step 0 and another record."""

    layer: str
    factor: float
    """Its norm there divided by its norm at step 0 (inf: NaN/Inf gradient, 0: exactly zero)."""


def optimisation_findings(trace: OptimisationTrace, thresholds: Thresholds | None = None) -> tuple[Finding, ...]:
    """One GC015 error when the trace is not stable, naming the layer whose gradient changed most.

    Pass the ``thresholds`` the trace was made with (they only pick the criterion in the evidence).
    """
    if trace.verdict == STABLE or not trace.steps:
        return ()
    limits = thresholds or Thresholds()
    records = trace.steps
    first, last = records[0], records[-1]
    onset = trace.onset_step if trace.onset_step is not None else last.step
    at = next((r for r in records if r.step == onset), last)
    found = _departures(records, limits)
    evidence: dict[str, Any] = {
        "verdict": trace.verdict,
        "criterion": next((c for v, s, c in found if v == trace.verdict and s == onset), trace.verdict),
        "onset_step": onset,
        "steps": last.step,
        "optimizer": trace.optimizer,
        "lr": trace.lr,
        "grad_norm_step0": first.grad_norm,
        "grad_norm_onset": at.grad_norm,
        "loss_step0": first.loss,
        "loss_onset": at.loss,
        "attenuation_step0": first.attenuation,
        "attenuation_onset": at.attenuation,
    }
    loss = str(getattr(trace, "loss", "") or "")  # OptimisationTrace.loss: what the steps minimised
    if loss:
        evidence["loss"] = loss
    if trace.verdict == NON_FINITE:
        problem = Problem.NON_FINITE
        text, change, more = _non_finite_story(trace, onset, at, limits)
    else:
        problem = Problem.EXPLODING if trace.verdict == EXPLODING else Problem.VANISHING
        text, change, more = _departure_story(trace, onset, at, found, evidence["criterion"])
    evidence.update(more)
    evidence["layer_change"] = None if change is None else change.factor
    return (
        Finding(
            UNSTABLE_OPTIMISATION.code,
            UNSTABLE_OPTIMISATION.name,
            Severity.ERROR,
            problem,
            None if change is None else change.layer,
            text,
            evidence,
        ),
    )


_Story = tuple[str, _Change | None, dict[str, Any]]
"""A finding's message, the layer it names, and the evidence beyond what every GC015 carries."""


def _non_finite_story(trace: OptimisationTrace, onset: int, at: StepRecord, limits: Thresholds) -> _Story:
    """NaN/Inf: before any step (the probe's own findings say why), or after steps, with where it was heading."""
    records, first = trace.steps, trace.steps[0]
    evidence: dict[str, Any] = {}
    if onset == 0:
        codes = f"{NON_FINITE_GRADIENT.code}/{NON_FINITE_FORWARD.code}"
        text = f"the loss or a gradient is NaN/Inf before any optimiser step (see {codes})"
        change = _first_non_finite(trace, at)
    else:
        text = (
            f"after {onset} step(s) of {_setting(trace)} the loss or a gradient became NaN/Inf (loss {_fmt(at.loss)})"
        )
        earlier = _departures(records[:-1], limits)
        if earlier:
            verdict, step, _ = earlier[0]
            before = next(r for r in records if r.step == step)
            evidence["left_band_step"] = step
            evidence["left_band_verdict"] = verdict
            text += (
                f"; it was {verdict} from step {step}: total gradient norm {_fmt(before.grad_norm)} against "
                f"{_fmt(first.grad_norm)} at step 0, loss {_fmt(before.loss)} against {_fmt(first.loss)}"
            )
        change = _first_non_finite(trace, at) or _most_changed(trace, records[-2], EXPLODING)
    if change is not None and math.isinf(change.factor):
        text += f"; the first layer with a NaN/Inf gradient: {change.layer}"
    elif change is not None:
        text += f"; the layer whose gradient grew most before that: {change.layer} ({_fmt(change.factor)}×)"
    text += "; lower the learning rate, or clip the gradient norm with error_if_nonfinite=True"
    return text, change, evidence


def _departure_story(
    trace: OptimisationTrace,
    onset: int,
    at: StepRecord,
    found: Sequence[tuple[str, int | None, str]],
    criterion: str,
) -> _Story:
    """Exploding or collapsing: the measure that decided, against step 0's, and what came next."""
    first, last = trace.steps[0], trace.steps[-1]
    evidence: dict[str, Any] = {}
    change = _most_changed(trace, at, trace.verdict)
    norm = f"total gradient norm {_fmt(at.grad_norm)} against {_fmt(first.grad_norm)} at step 0"
    path = f"path attenuation {_fmt(at.attenuation)} against {_fmt(first.attenuation)} at step 0"
    what = "grew" if trace.verdict == EXPLODING else "collapsed"
    if criterion.startswith("attenuation"):
        what = "at the input end " + what
        norm, path = path, norm
    text = (
        f"during {last.step} step(s) of {_setting(trace)} the gradient {what} from step {onset}: {norm} "
        f"({path}), loss {_fmt(at.loss)} against {_fmt(first.loss)}"
    )
    if change is not None:
        moved = "fell to exactly 0" if change.factor == 0 else f"{_fmt(change.factor)}× step 0's"
        text += f"; the layer whose gradient changed most: {change.layer} ({moved})"
    later = [(v, s) for v, s, _ in found if v != trace.verdict and s is not None and s > onset]
    if later:
        evidence["then"] = {"verdict": later[0][0], "onset_step": later[0][1]}
        text += f"; then {later[0][0]} from step {later[0][1]}"
    text += (
        "; lower the learning rate or clip the gradient norm"
        if trace.verdict == EXPLODING
        else "; steps this large drive units dead or into saturation: lower the learning rate"
    )
    return text, change, evidence


def _setting(trace: OptimisationTrace) -> str:
    """The optimiser and learning rate as messages write them: ``SGD at lr 0.5``."""
    try:
        spelled = Optimizer(trace.optimizer).spelled
    except ValueError:  # a trace from elsewhere may name another optimiser: as it is
        spelled = trace.optimizer
    return f"{spelled} at lr {trace.lr:g}"


def _first_non_finite(trace: OptimisationTrace, at: StepRecord) -> _Change | None:
    for name, norm in zip(trace.layers, at.layer_grad_norms, strict=False):
        if not math.isfinite(norm) and not (math.isnan(norm) and _never_measured(trace, name)):
            return _Change(name, math.inf)
    return None


def _never_measured(trace: OptimisationTrace, layer: str) -> bool:
    """NaN in ``layer_grad_norms`` also stands for 'no gradient reached it'; step 0 tells them apart."""
    index = trace.layers.index(layer)
    return math.isnan(trace.steps[0].layer_grad_norms[index])


def _most_changed(trace: OptimisationTrace, at: StepRecord, verdict: str) -> _Change | None:
    """Largest growth (exploding: the earliest such layer) or largest fall (else: the latest, nearest the output)."""
    pairs = zip(trace.layers, trace.steps[0].layer_grad_norms, at.layer_grad_norms, strict=False)
    factors = [(name, b / a) for name, a, b in pairs if math.isfinite(a) and a > 0 and math.isfinite(b)]
    if not factors:
        return None
    if verdict == EXPLODING:
        name, factor = max(factors, key=lambda item: item[1])
    else:
        name, factor = min(reversed(factors), key=lambda item: item[1])
    return _Change(name, factor)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
