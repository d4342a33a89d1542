"""Verified recommendations: apply each fix to a copy of the model, probe it again, compare.

Every recommendation that can be applied in memory (:mod:`gradcheck_cli.advise.fixes`) is applied to a
fresh deep copy of the model, which then goes through the same probe (same batch, seed, mode and
thresholds) and the same rules; the report's numbers are the "before", the copy's the "after".
The user's model is never touched, the random initialisers run under a forked, seeded RNG (the
caller's random state is left as it was) and each copy is freed before the next one is made.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import re
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradcheck_cli.advise.fixes import FIXES, SEEN_IN_FORWARD, UNVERIFIABLE, NotApplicable, clip_gradients
from gradcheck_cli.advise.optimise import trace_optimisation
from gradcheck_cli.diagnose.rule_codes import UNSTABLE_OPTIMISATION
from gradcheck_cli.diagnose.rules import Diagnosis, Thresholds, diagnose
from gradcheck_cli.errors import first_line
from gradcheck_cli.load.batch import Batch, make_batch
from gradcheck_cli.load.model_copy import copy_model
from gradcheck_cli.probe.measure import probe, probe_scaled
from gradcheck_cli.probe.modules import unwrap
from gradcheck_cli.report.report import LayerStats, Problem, Recommendation, Report, Severity
from gradcheck_cli.report.sections import Outcome, Verification
from gradcheck_cli.settings import Optimizer, ProbeSettings

SMALLEST = 1.401298464324817e-45
"""float32's smallest subnormal: a gradient that underflowed to exactly 0 counts as this small."""
LARGEST = 3.4028234663852886e38
"""float32's largest value: an overflowed (infinite) ratio counts as this large."""
NON_FINITE_ORDERS = 100.0
"""How far outside the healthy band a non-finite run counts: more than any finite float32 ratio can be (83)."""


def verify_recommendations(
    model: nn.Module,
    batch: Batch | torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any],
    report: Report,
    settings: ProbeSettings | None = None,
    *,
    loss_scale: float = 1.0,
) -> tuple[Verification, ...]:
    """Apply each of ``report.recommendations`` to a deep copy of ``model`` and re-probe it.

    ``settings`` are the ones the report was made with (seed, mode, ``unfreeze``, thresholds, ``autocast``);
    by default the defaults with the report's own thresholds. ``loss_scale``: the scale the report's own
    pass used (``--autocast fp16``), so the copies are probed the same way.
    ``batch`` is the one the report was measured on (a :class:`Batch`, or what ``check()``
    accepts). Returns one :class:`Verification` per recommendation, in the same order. ``before`` is the
    report's verdict; ``after`` is ``diagnose(probe(copy, batch, ...))`` with the same settings.

    ``effect`` is how many orders of magnitude the run moved into (or towards) the healthy band
    [``thresholds.vanishing``, ``thresholds.exploding``]. A run's distance from the band is the
    largest of: log10(vanishing / r) for a ratio r below the band, log10(r / exploding) above it,
    0 inside, taken over the path attenuation and every fused RNN/LSTM/GRU layer's
    through-time ratio (first step / last step). A ratio that underflowed to 0 counts as float32's
    smallest subnormal (1.4e-45), an infinite one as float32's largest value, and a non-finite
    run (a ``non_finite`` problem) as 100 orders away, further than any finite ratio can be.
    ``effect = distance(before) - distance(after)``: positive means better, 0 when both runs are
    inside the band, about +100 when NaN/Inf became finite, negative when the fix made it worse.

    ``fixed`` is true when the copy's verdict is healthy and no finding with a problem remains,
    not even a warning (a gated RNN's vanishing-through-time warning keeps it false).

    ``gradient_clipping`` is verified by clipping the copy's gradients: the total norm is
    bounded but every layer is scaled alike, so the flow is unchanged (``effect`` 0, not fixed).
    ``mixed_precision_scaling`` is verified by probing in fp16 without and with the recommended
    loss scale (:func:`_verify_scaling`). Fixes that need training or new code (``lstm_gru``,
    ``lower_lr``, ``weight_decay``, ``reconnect_graph``) and unknown ids come back unverified with
    the reason. When the model cannot be deep-copied, every recommendation comes back
    unverified with that reason.
    """
    model = unwrap(model)
    ready = batch if isinstance(batch, Batch) else make_batch(batch, model)
    run = _Run.of(model, ready, report, settings or ProbeSettings(thresholds=_report_thresholds(report)), loss_scale)
    copies = _Copies(model)
    if any(_changes_a_copy(r.id) for r in report.recommendations):
        try:
            copies.prepare()
        except Exception as exc:  # deepcopy can raise anything a __deepcopy__/__reduce__ raises
            reason = f"the model cannot be deep-copied ({type(exc).__name__}: {first_line(exc)}), so no fix was tried"
            return tuple(Verification(r.id, False, before=run.before, reason=reason) for r in report.recommendations)
    return tuple(_verify(run, rec, copies) for rec in report.recommendations)


@dataclass(frozen=True)
class _Run:
    """What every verification of one report shares: the model, batch and settings, and the "before"."""

    model: nn.Module
    batch: Batch
    report: Report
    settings: ProbeSettings
    loss_scale: float
    before: Outcome
    before_distance: float
    training_only: bool
    """Only the optimisation probe found a problem (GC015): one pass of a copy cannot show it fixed."""
    devices: list[int]
    """The CUDA devices whose RNG each fix's seeded initialisers fork."""

    @classmethod
    def of(cls, model: nn.Module, batch: Batch, report: Report, settings: ProbeSettings, loss_scale: float) -> _Run:
        before = report_outcome(report)
        distance = _distance(before.attenuation, report.layers, before.finite, settings.thresholds)
        training_only = report.optimisation is not None and not any(
            f.severity is Severity.ERROR and f.problem is not None and f.code != UNSTABLE_OPTIMISATION.code
            for f in report.findings
        )
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        return cls(model, batch, report, settings, loss_scale, before, distance, training_only, devices)


class _Copies:
    """Fresh copies of the model, one per fix; the first made up front (to fail early), its time kept for the
    fix that uses it."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._first: nn.Module | None = None
        self._first_seconds = 0.0

    def prepare(self) -> None:
        """Make the first copy now; raises what copying raises."""
        started = time.perf_counter()
        self._first = _copy_model(self._model)
        self._first_seconds = time.perf_counter() - started

    def take(self) -> tuple[nn.Module, float]:
        """A copy nobody else holds, and the seconds already spent making it."""
        if self._first is None:
            return _copy_model(self._model), 0.0
        work, seconds = self._first, self._first_seconds
        self._first, self._first_seconds = None, 0.0
        return work, seconds


def _changes_a_copy(rec_id: str) -> bool:
    return rec_id in FIXES or rec_id == "gradient_clipping"


def _verify(run: _Run, rec: Recommendation, copies: _Copies) -> Verification:
    """One recommendation tried: on the optimisation probe, in fp16, on a changed copy, or unverified with why."""
    report, before = run.report, run.before
    if rec.id == "lower_lr" and report.optimisation is not None:
        return _verify_lower_lr(run)
    if rec.id == "mixed_precision_scaling" and report.precision is not None:
        return _verify_scaling(run)
    if not _changes_a_copy(rec.id):
        reason = UNVERIFIABLE.get(rec.id, f"gradcheck has no in-memory fix for {rec.id!r}")
        return Verification(rec.id, False, before=before, reason=reason)
    start = time.perf_counter()
    try:
        work, spent = copies.take()
    except Exception as exc:
        reason = f"the model cannot be deep-copied ({type(exc).__name__}: {first_line(exc)})"
        return Verification(rec.id, False, before=before, reason=reason)
    start -= spent  # the first copy was made up front, to fail early
    alive = weakref.ref(work)
    with torch.random.fork_rng(devices=run.devices):
        torch.manual_seed(run.settings.seed)
        outcome = _apply(work, rec, run)
    del work
    if alive() is not None:  # a reference cycle inside the model: free the copy before the next one
        gc.collect()
    seconds = time.perf_counter() - start
    if isinstance(outcome, str):
        return Verification(rec.id, False, before=before, reason=outcome, seconds=seconds)
    applied, after, diagnosis, clipped = outcome
    distance = _distance(after.attenuation, diagnosis.layers, after.finite, run.settings.thresholds)
    effect = 0.0 if clipped else run.before_distance - distance
    fixed = not clipped and not any(f.problem is not None for f in diagnosis.findings)
    if run.training_only and not clipped:
        fixed = False
        applied += (
            f"; the problem shows only during training ({UNSTABLE_OPTIMISATION.code}), which one pass of the copy "
            "cannot show: "
            "re-run with --steps to see"
        )
    return Verification(
        rec.id, True, applied=applied, before=before, after=after, effect=effect, fixed=fixed, seconds=seconds
    )


LR_FACTOR = 0.1
"""``lower_lr`` is verified by re-running the optimisation probe at this fraction of the learning rate."""


def _verify_lower_lr(run: _Run) -> Verification:
    """Re-run the optimisation probe (same steps, optimiser, seed) at a tenth of the learning rate."""
    trace = run.report.optimisation
    assert trace is not None
    before = run.before
    started = time.perf_counter()
    lr = trace.lr * LR_FACTOR
    try:
        steps = max(1, len(trace.steps) - 1)
        again_with = dataclasses.replace(run.settings, steps=steps, lr=lr, optimizer=Optimizer(trace.optimizer))
        again = trace_optimisation(run.model, run.batch, again_with)
    except Exception as exc:  # the copy or the optimiser can fail on unusual models
        reason = f"re-running the optimisation probe failed ({type(exc).__name__}: {first_line(exc)})"
        return Verification("lower_lr", False, before=before, reason=reason)
    last = again.steps[-1]
    stable = again.verdict == "stable"
    after = Outcome(
        status="healthy" if stable else "unhealthy",
        problems=() if stable else (again.verdict,),
        attenuation=last.attenuation,
        gain=last.gain,
        finite=again.verdict != "non_finite",
    )
    applied = (
        f"re-ran the optimisation probe on a copy at lr {lr:g} ({trace.optimizer}, {len(again.steps) - 1} steps): "
        f"{again.verdict}" + ("" if stable else f" from step {again.onset_step}")
    )
    return Verification(
        "lower_lr", True, applied=applied, before=before, after=after, effect=0.0, fixed=stable,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


SCALING_FIXED = 0.01
"""Loss scaling counts as a fix when no layer loses more than this share of its gradient to fp16 underflow."""


def _verify_scaling(run: _Run) -> Verification:
    """Probe in fp16 without and with the recommended loss scale; compare the gradient lost to zero.

    A model held in fp16 is probed as it is; a float32 model under fp16 autocast. The loss is
    multiplied by the scale before backward and every gradient divided back, as GradScaler does.
    What is lost, per layer, is the share of gradient elements that are zero in fp16 but not in the
    float32 reference (the report's own measurement); the verification compares the worst layer.
    """
    model, batch, report, before = run.model, run.batch, run.report, run.before
    options = run.settings.pass_options()
    assert report.precision is not None
    started = time.perf_counter()
    scale = report.precision.recommended_scale
    half = any(p.dtype == torch.float16 for p in model.parameters())
    autocast = None if half else "fp16"
    reference = {p.layer: p.zero for p in report.precision.layers}
    try:
        plain = probe(model, batch, **options, autocast=autocast, precision=True)
        scaled = probe_scaled(model, batch, **options, autocast=autocast, loss_scale=scale, precision=True)
    except Exception as exc:  # the user's forward under autocast can raise anything
        reason = f"probing with a loss scale failed ({type(exc).__name__}: {first_line(exc)})"
        return Verification("mixed_precision_scaling", False, before=before, reason=reason)
    scale = scaled.loss_scale
    lost_before, lost_after = _worst_lost(plain, reference), _worst_lost(scaled, reference)
    diagnosis = diagnose(scaled, run.settings.thresholds)
    after = diagnosis_outcome(diagnosis)
    where = "as it is (fp16)" if half else "under fp16 autocast"
    applied = (
        f"probed {where} with the loss scaled by 2^{round(math.log2(scale))} (GradScaler-style, gradients divided "
        f"back): the largest share of a layer's gradient lost to zero went from {lost_before:.1%} to {lost_after:.1%}"
    )
    fixed = lost_after < SCALING_FIXED and not any(f.problem is not None for f in diagnosis.findings)
    return Verification(
        "mixed_precision_scaling",
        True,
        applied=applied,
        before=before,
        after=after,
        effect=0.0,
        fixed=fixed,
        seconds=time.perf_counter() - started,
    )


def _worst_lost(result: Any, reference: dict[str, float]) -> float:
    """The largest per-layer share of gradient elements that are zero here but not in the float32 reference."""
    worst = 0.0
    for measure, hist in zip(result.layers, result.precision, strict=True):
        total = sum(hist)
        if total and measure.name in reference:
            worst = max(worst, hist[0] / total - reference[measure.name])
    return worst


def order_by_effect(
    recommendations: Sequence[Recommendation], verifications: Sequence[Verification]
) -> tuple[tuple[Recommendation, ...], tuple[Verification, ...]]:
    """Both sequences reordered alike, by what the copies showed.

    1. fixed (the copy became healthy), largest effect first;
    2. verified with a positive effect that did not reach health, largest first;
    3. unverifiable ones, in the advisor's order (nothing speaks against them);
    4. verified without a positive effect (clipping, which never changes the flow, or a fix
       that made things worse): tried, and shown not to help the gradient flow.

    Equal effects (every fix that reaches the band from the same start has the same one) are
    broken by how close the copy's attenuation came to 1 (|log10 attenuation|, smallest first).
    The sort is stable, so remaining ties keep their original order.
    """
    if len(recommendations) != len(verifications):
        raise ValueError(f"{len(recommendations)} recommendations but {len(verifications)} verifications")
    for rec, ver in zip(recommendations, verifications, strict=True):
        if rec.id != ver.id:
            raise ValueError(f"recommendation {rec.id!r} is paired with the verification of {ver.id!r}")

    def key(index: int) -> tuple[int, float, float]:
        ver = verifications[index]
        if not ver.verified:
            return (2, 0.0, 0.0)
        effect = -math.inf if ver.effect is None or math.isnan(ver.effect) else ver.effect
        if ver.fixed:
            return (0, -effect, _from_one(ver.after))
        return (1 if effect > 0 else 3, -effect, _from_one(ver.after))

    order = sorted(range(len(verifications)), key=key)
    return tuple(recommendations[i] for i in order), tuple(verifications[i] for i in order)


def _from_one(outcome: Outcome | None) -> float:
    """|log10 attenuation|: how far the path is from passing the gradient on unchanged (inf when unknown)."""
    if outcome is None or outcome.attenuation is None or not outcome.finite:
        return math.inf
    return abs(math.log10(min(max(outcome.attenuation, SMALLEST), LARGEST)))


def report_outcome(report: Report) -> Outcome:
    """The report's headline numbers as the "before" of every verification."""
    return Outcome(
        status="healthy" if report.healthy else "unhealthy",
        problems=tuple(p.value for p in report.problems),
        attenuation=report.path.attenuation,
        gain=report.path.gain,
        finite=not any(f.problem is Problem.NON_FINITE for f in report.findings),
        through_time=worst_through_time(report.layers),
    )


def diagnosis_outcome(diagnosis: Diagnosis) -> Outcome:
    """A diagnosis's headline numbers: healthy iff no error-severity finding names a problem."""
    errors = {f.problem for f in diagnosis.findings if f.severity is Severity.ERROR and f.problem is not None}
    return Outcome(
        status="unhealthy" if errors else "healthy",
        problems=tuple(p.value for p in Problem if p in errors),
        attenuation=diagnosis.path.attenuation,
        gain=diagnosis.path.gain,
        finite=not any(f.problem is Problem.NON_FINITE for f in diagnosis.findings),
        through_time=worst_through_time(diagnosis.layers),
    )


_Applied = tuple[str, Outcome, Diagnosis, bool]
"""What was done, the copy's outcome and diagnosis, and whether it was clipping."""


def _apply(work: nn.Module, rec: Recommendation, run: _Run) -> _Applied | str:
    """Apply ``rec`` to ``work`` and probe it as the report's own pass was; the reason as a string when that is not
    possible."""
    report, settings = run.report, run.settings
    clipping = rec.id == "gradient_clipping"
    if not clipping and isinstance(work, torch.jit.ScriptModule):
        return "TorchScript modules cannot be changed in memory: apply the fix to the Python model and script it again"
    if not clipping:
        seen = {layer.layer: layer.activation for layer in report.init_audit.layers} if report.init_audit else {}
        token = SEEN_IN_FORWARD.set(seen)
        try:
            applied = FIXES[rec.id](work)
        except NotApplicable as exc:
            return str(exc)
        except Exception as exc:  # a fix on an unusual model can fail in torch: report it, do not crash
            return f"applying it failed: {type(exc).__name__}: {first_line(exc)}"
        finally:
            SEEN_IN_FORWARD.reset(token)
    try:
        result = probe(
            work, run.batch, **settings.pass_options(), keep_grads=clipping,
            autocast=settings.autocast_name, loss_scale=run.loss_scale,
        )  # fmt: skip
    except Exception as exc:
        return f"the changed copy could not be probed: {first_line(exc)}"
    diagnosis = diagnose(result, settings.thresholds)
    after = diagnosis_outcome(diagnosis)
    if clipping:
        max_norm = _max_norm(rec, report)
        try:
            total, clipped = clip_gradients(work, max_norm)
        except NotApplicable as exc:
            return str(exc)
        except Exception as exc:  # unusual gradients (sparse, several devices)
            return f"clipping the copy's gradients failed: {type(exc).__name__}: {first_line(exc)}"
        applied = _clipping_words(max_norm, total, clipped, after)
    return applied, after, diagnosis, clipping


def _clipping_words(max_norm: float, total: float, clipped: float, after: Outcome) -> str:
    done = f"clipped the copy's gradients with clip_grad_norm_(max_norm={max_norm:.3g})"
    if not math.isfinite(total):
        return (
            f"{done}: the total gradient norm is {total}, which clipping cannot make finite (with "
            "error_if_nonfinite=True the step raises and can be skipped); the flow is unchanged"
        )
    attenuation = "n/a" if after.attenuation is None else f"{after.attenuation:.3g}"
    if total <= max_norm:
        return (
            f"{done}: the total gradient norm {total:.3g} is already below it, so the step is unchanged; "
            f"so is the per-layer attenuation ({attenuation})"
        )
    return (
        f"{done}: the total gradient norm went from {total:.3g} to {clipped:.3g}, so the step is bounded; every "
        f"layer is scaled by the same factor, so the per-layer attenuation ({attenuation}) is unchanged and the "
        "flow is not fixed"
    )


_MAX_NORM = re.compile(r"max_norm\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def _max_norm(rec: Recommendation, report: Report) -> float:
    """The ``max_norm`` in the snippet, or what advice.py would suggest from the report's layers."""
    for text in (rec.snippet, rec.why):
        match = _MAX_NORM.search(text)
        if match:
            value = float(match.group(1))
            if value > 0 and math.isfinite(value):
                return value
    grads = [layer.grad_norm for layer in report.layers if layer.grad_norm is not None]
    grads = [g for g in grads if math.isfinite(g)]
    outer = next((layer.grad_norm for layer in reversed(report.layers) if layer.grad_norm), None)
    if outer and grads and math.isfinite(outer):
        return outer * math.sqrt(len(grads))
    return 1.0


def _report_thresholds(report: Report) -> Thresholds:
    default = Thresholds()
    return Thresholds(
        vanishing=report.thresholds.get("vanishing_attenuation", default.vanishing),
        exploding=report.thresholds.get("exploding_attenuation", default.exploding),
    )


def _outside(ratio: float, limits: Thresholds) -> float:
    """Orders of magnitude ``ratio`` lies outside [vanishing, exploding]; 0 inside."""
    r = min(max(ratio, SMALLEST), LARGEST)
    if r < limits.vanishing:
        return math.log10(limits.vanishing / r)
    if r > limits.exploding:
        return math.log10(r / limits.exploding)
    return 0.0


def through_time_ratios(layers: Sequence[LayerStats]) -> list[float]:
    """First-step / last-step gradient of every fused recurrent layer with a finite time profile."""
    ratios = []
    for layer in layers:
        profile = layer.time_grad_norms
        if len(profile) >= 2 and all(math.isfinite(v) for v in profile) and profile[-1] > 0:
            ratios.append(profile[0] / profile[-1])
    return ratios


def worst_through_time(layers: Sequence[LayerStats]) -> float | None:
    """The through-time ratio farthest from 1 in orders of magnitude, or None without fused recurrent layers."""
    ratios = through_time_ratios(layers)
    return max(ratios, key=lambda r: abs(math.log10(min(max(r, SMALLEST), LARGEST))), default=None)


def _distance(attenuation: float | None, layers: Sequence[LayerStats], finite: bool, limits: Thresholds) -> float:
    if not finite:
        return NON_FINITE_ORDERS
    ratios = through_time_ratios(layers)
    if attenuation is not None and not math.isnan(attenuation):
        ratios.append(attenuation)
    return max((_outside(r, limits) for r in ratios), default=0.0)


def _copy_model(model: nn.Module) -> nn.Module:
    """A copy of ``model``: parameters, buffers, modes and flags, sharing no tensor with it."""
    return copy_model(model)
