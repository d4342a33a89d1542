"""``gradcheck history grads.jsonl``: the rules over training time, as one frozen Report.

Each record is judged again, in order, by the same function ``watch`` used live (history_rules.assess),
so a log written by an older gradcheck is read with today's rules. The report's ``layers`` and ``path``
are those of the record where the first problem began (the last record when the run stayed healthy);
``history`` holds every record's summary, each problem's onset, the gain trend and the clipping norm
the healthy part of the run suggests.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from gradcheck_cli.diagnose.rule_codes import TRAINING_LOSS_NON_FINITE
from gradcheck_cli.diagnose.rules import Thresholds
from gradcheck_cli.report.report import Finding, PathSummary, Problem, Recommendation, Report, RunInfo, Severity
from gradcheck_cli.report.sections import Onset, StepRecord, TrainingHistory
from gradcheck_cli.training.log import History, StepLog, read_history
from gradcheck_cli.training.rules import STOPPING, Assessment, Baseline, advance, assess
from gradcheck_cli.version import __version__

CLIP_FACTOR = 2.0
"""``clip_max_norm`` = this × the healthy median: ordinary steps pass untouched, spikes are cut."""


def history_report(path: Path, thresholds: Thresholds | None = None) -> Report:
    """Read the last run of ``path`` and judge it."""
    return judge(read_history(path), thresholds)


def judge(history: History, thresholds: Thresholds | None = None) -> Report:
    limits = thresholds or Thresholds()
    records = history.records
    assessments = _assess_all(records, history.header.scaler, limits)
    onsets = _onsets(records, assessments)
    tail = _tail_onset(history, assessments, onsets)
    if tail is not None:
        onsets.append(tail)
    first = min(onsets, key=_onset_order) if onsets else None
    focus = _focus(assessments, first)
    blowups = [o for o in onsets if o.problem != Problem.VANISHING.value]
    cut = min(o.step for o in blowups) if blowups else None
    before = [a for a in assessments if cut is None or a.step < cut]
    healthy_norms = [a.total_norm for a in before if calm(a) and a.total_norm > 0]
    median = statistics.median(healthy_norms) if healthy_norms else None
    clip = _two_digits(CLIP_FACTOR * median) if median else None
    trace = TrainingHistory(
        source=history.source,
        every=history.header.every,
        records=len(records),
        layers=tuple(layer.name for layer in records[0].layers) if records else (),
        steps=tuple(_step_record(r, a) for r, a in zip(records, assessments, strict=True)),
        verdict=_verdict(onsets),
        onsets=tuple(sorted(onsets, key=_onset_order)),
        problem_steps=tuple((a.step, tuple(p.value for p in a.problems)) for a in assessments if a.problems),
        gain_first=_gain(assessments[0]) if assessments else None,
        gain_last=_gain(assessments[-1]) if assessments else None,
        gain_trend=_trend([(a.step, _gain(a)) for a in before if calm(a)]),
        healthy_norm_median=median,
        healthy_norm_max=max(healthy_norms) if healthy_norms else None,
        clip_max_norm=clip,
        earlier_runs=history.earlier_runs,
        skipped_lines=history.skipped_lines,
    )
    findings = _findings(focus, onsets, assessments)
    if tail is not None:
        findings.append(
            Finding(
                TRAINING_LOSS_NON_FINITE.code,
                TRAINING_LOSS_NON_FINITE.name,
                Severity.ERROR,
                Problem.NON_FINITE,
                None,
                tail.message,
                {"step": tail.step, "onset_step": tail.step},
            )
        )
    notes = list(history.header.notes) + _notes(history, records)
    last_loss = next((r.loss for r in reversed(records) if r.loss is not None), math.nan)
    run = RunInfo(
        source=history.source,
        checkpoint_kind="training_history",
        model_type=history.header.model,
        parameters=history.header.parameters,
        mode="train",
        seed=0,
        batch=f"{len(records)} recorded steps, every {history.header.every}",
        batch_source="watch() inside the training loop",
        loss="the training loop's own loss",
        loss_kind="training",
        loss_value=last_loss,
        device="",
        gradcheck_version=__version__,
        torch_version=history.header.torch_version or _installed_torch(),
    )
    diagnosis = focus.diagnosis if focus is not None else None
    return Report(
        run=run,
        layers=diagnosis.layers if diagnosis else (),
        path=diagnosis.path if diagnosis else _empty_path(),
        findings=tuple(findings),
        recommendations=tuple(_recommendations(trace, onsets, assessments, history.header.scaler)),
        notes=tuple(notes),
        thresholds=limits.as_dict(),
        history=trace,
    )


def _onset_order(onset: Onset) -> tuple[int, int]:
    """Earliest first; at the same step a spike or NaN/Inf before vanishing, which a blow-up brings along
    (tanh and sigmoid saturate after one huge step, and the gradient behind them underflows)."""
    return onset.step, 1 if onset.problem == Problem.VANISHING.value else 0


def _tail_onset(history: History, assessments: Sequence[Assessment], onsets: Sequence[Onset]) -> Onset | None:
    """The loss went NaN/Inf after the last record (the watch read it when it closed)."""
    step = history.tail_non_finite_step
    if step is None or any(o.problem == Problem.NON_FINITE.value and o.step <= step for o in onsets):
        return None
    last = next((a.step for a in reversed(assessments) if not a.problems and a.step < step), None)
    return Onset(
        problem=Problem.NON_FINITE.value,
        step=step,
        last_healthy_step=last,
        codes=(TRAINING_LOSS_NON_FINITE.code,),
        layers=(),
        message=f"the loss was NaN/Inf at step {step}, after the last recorded step",
    )


def _verdict(onsets: Sequence[Onset]) -> str:
    """The problems in onset order; vanishing that training repaired does not count (its finding is a warning)."""
    ordered = sorted(onsets, key=_onset_order)
    lasting = [o.problem for o in ordered if not _repaired(o)]
    repaired = [f"{o.problem} until step {o.resolved_step}" for o in ordered if _repaired(o)]
    head = ", ".join(lasting) or "healthy"
    return f"{head} ({'; '.join(repaired)})" if repaired else head


def _repaired(onset: Onset) -> bool:
    return onset.resolved_step is not None and onset.problem == Problem.VANISHING.value


def _assess_all(records: Sequence[StepLog], scaler: bool, limits: Thresholds) -> list[Assessment]:
    baseline = Baseline()
    out = []
    for record in records:
        assessment = assess(record, baseline, scaler=record.scale is not None, thresholds=limits)
        advance(baseline, record, assessment)
        out.append(assessment)
    return out


def _onsets(records: Sequence[StepLog], assessments: Sequence[Assessment]) -> list[Onset]:
    onsets = []
    for problem in Problem:
        at = next((i for i, a in enumerate(assessments) if problem in a.problems), None)
        if at is None:
            continue
        assessment, record = assessments[at], records[at]
        errors = [f for f in assessment.findings if f.problem is problem and f.severity is Severity.ERROR]
        step = min([assessment.step, *(int(f.evidence["from_step"]) for f in errors if "from_step" in f.evidence)])
        if problem is Problem.NON_FINITE:
            exact = [r.loss_non_finite_step for r in records[: at + 1] if r.loss_non_finite_step is not None]
            step = min([step, *exact])
        last_healthy = next((a.step for a in reversed(assessments[:at]) if not a.problems and a.step < step), None)
        layers = [f.layer for f in errors if f.layer]
        if problem is Problem.NON_FINITE and record.first_non_finite:
            layers.insert(0, record.first_non_finite)
        layers += [la.name for la in assessment.diagnosis.layers if problem.value in la.flags]
        grown: list[tuple[str, float]] = []
        if problem is Problem.EXPLODING and last_healthy is not None:
            healthy_record = next(r for r in records if r.step == last_healthy)
            grown = _grown_layers(healthy_record, next(r for r in records if r.step >= step))
            layers = [name for name, _ in grown] + layers
        last_bad = max(i for i, a in enumerate(assessments) if problem in a.problems)
        after = assessments[last_bad + 1 :]
        # NaN/Inf records cannot show vanishing (the path is not followed through them): they do not repair it
        gone = not any(problem in a.problems or Problem.NON_FINITE in a.problems for a in after)
        resolved = after[0].step if after and gone else None
        onsets.append(
            Onset(
                problem=problem.value,
                step=step,
                last_healthy_step=last_healthy,
                codes=tuple(dict.fromkeys(f.code for f in errors)),
                layers=tuple(dict.fromkeys(layers))[:10],
                message=errors[0].message if errors else "",
                resolved_step=resolved,
                grown=tuple(grown),
            )
        )
    return onsets


GROWN = 3
"""Layers named as having grown most at an exploding onset."""


def _grown_layers(before: StepLog, at: StepLog) -> list[tuple[str, float]]:
    """The layers whose gradient norm grew most between two records, by factor (at least 2×)."""
    factors = []
    for old, new in zip(before.layers, at.layers, strict=True):
        if old.grad is None or new.grad is None or old.grad.l2 <= 0 or not math.isfinite(new.grad.l2):
            continue
        factors.append((old.name, new.grad.l2 / old.grad.l2))
    factors.sort(key=lambda item: -item[1])
    return [(name, factor) for name, factor in factors[:GROWN] if factor >= 2.0]


def _focus(assessments: Sequence[Assessment], first: Onset | None) -> Assessment | None:
    """The record the report's layer table shows: the first unhealthy one, else the last."""
    if not assessments:
        return None
    if first is not None:
        return next((a for a in assessments if a.problems), assessments[-1])
    return assessments[-1]


def _findings(focus: Assessment | None, onsets: Sequence[Onset], assessments: Sequence[Assessment]) -> list[Finding]:
    """The onset record's findings, each saying its step; the later records' are summarised in ``history``."""
    findings: list[Finding] = []
    seen: set[tuple[str, str | None]] = set()
    for onset in sorted(onsets, key=_onset_order):
        at = next((a for a in assessments if onset.problem in {p.value for p in a.problems}), None)
        if at is None:  # the loss went NaN/Inf after the last record: its finding is added by the caller
            continue
        for f in at.findings:
            key = (f.code, f.layer)
            if key in seen or (f.problem is not None and f.problem.value != onset.problem):
                continue
            seen.add(key)
            message = f.message if f.message.startswith("step ") else f"step {at.step}: {f.message}"
            evidence = {**f.evidence, "step": f.evidence.get("step", at.step), "onset_step": onset.step}
            if onset.last_healthy_step is not None:
                evidence["last_healthy_step"] = onset.last_healthy_step
            severity = f.severity
            if _repaired(onset):
                # training itself repaired it (weights grew into the gain that carries the gradient): worth
                # knowing, not a failed run; a spike or NaN/Inf that passed still is one
                severity = Severity.WARNING if severity is Severity.ERROR else severity
                message += f" (resolved: no record from step {onset.resolved_step} on shows it)"
                evidence["resolved_step"] = onset.resolved_step
            findings.append(Finding(f.code, f.name, severity, f.problem, f.layer, message, evidence))
    if focus is not None and not onsets:
        findings += [f for f in focus.findings if f.severity is not Severity.ERROR]
    return findings


def _recommendations(
    trace: TrainingHistory, onsets: Sequence[Onset], assessments: Sequence[Assessment], scaler: bool
) -> list[Recommendation]:
    problems = {o.problem for o in onsets}
    out: list[Recommendation] = []
    blowup = problems & {Problem.EXPLODING.value, Problem.NON_FINITE.value}
    if blowup and trace.clip_max_norm is not None:
        onset = min((o for o in onsets if o.problem in blowup), key=lambda o: o.step)
        peak = max(
            (a.total_norm for a in assessments if a.step >= onset.step and math.isfinite(a.total_norm)), default=None
        )
        peak_text = f", and reached {peak:.3g} from step {onset.step} on" if peak is not None else ""
        before = [a.total_norm for a in assessments if a.step < onset.step and calm(a)]
        cut = sum(1 for n in before if n > trace.clip_max_norm)
        cut_text = (
            f"; it would have clipped {cut} of the {len(before)} healthy records too (larger early norms)"
            if cut
            else f"; none of the {len(before)} healthy records exceeds it"
        )
        out.append(
            Recommendation(
                id="gradient_clipping",
                title=f"Clip the total gradient norm at {trace.clip_max_norm:g}",
                why=(
                    f"before step {onset.step} the total gradient norm had a median of {trace.healthy_norm_median:.3g} "
                    f"(max {trace.healthy_norm_max:.3g}) over the healthy records{peak_text}; clipping at 2× the "
                    f"healthy median bounds the step size of a spike{cut_text}"
                ),
                snippet=_clip_snippet(trace.clip_max_norm, scaler),
                addresses=tuple(Problem(p) for p in sorted(blowup)),
            )
        )
    if blowup:
        onset = min((o for o in onsets if o.problem in blowup), key=lambda o: o.step)
        start = f"after step {onset.last_healthy_step}" if onset.last_healthy_step is not None else "from the start"
        out.append(
            Recommendation(
                id="lower_lr",
                title="Lower the learning rate (or lengthen the warm-up) around the onset",
                why=(
                    f"the run was healthy until {start} and went {onset.problem.replace('_', '/')} at step "
                    f"{onset.step}: the optimiser's steps grew past what the weights tolerate; a smaller learning "
                    "rate from there (or a longer warm-up, or a schedule that has decayed by then) keeps them stable"
                ),
                snippet=(
                    "for group in optimizer.param_groups:\n"
                    '    group["lr"] *= 0.1  # or: a longer warm-up in the LR scheduler'
                ),
                addresses=tuple(Problem(p) for p in sorted(blowup)),
            )
        )
    return out


def _clip_snippet(max_norm: float, scaler: bool) -> str:
    if scaler:
        return (
            "scaler.scale(loss).backward()\n"
            "scaler.unscale_(optimizer)  # clip the unscaled gradients\n"
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})\n"
            "scaler.step(optimizer)\n"
            "scaler.update()"
        )
    return (
        f"loss.backward()\ntorch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={max_norm:g})\noptimizer.step()"
    )


def calm(assessment: Assessment) -> bool:
    """No spike and no NaN/Inf (vanishing allowed): a record the healthy statistics may use."""
    return not (set(assessment.problems) & STOPPING) and math.isfinite(assessment.total_norm)


def _notes(history: History, records: Sequence[StepLog]) -> list[str]:
    notes = []
    if history.earlier_runs:
        notes.append(f"the file holds {history.earlier_runs + 1} runs; this report reads the last")
    if history.skipped_lines:
        notes.append(f"{history.skipped_lines} line(s) could not be read (a crash mid-write truncates the last)")
    if not records:
        notes.append("the run wrote no record yet (the first is written at the first recorded step())")
    if any(r.loss is None for r in records):
        notes.append(
            "no loss was given to step(); pass it (w.step(loss)) to record it and to catch NaN/Inf between records"
        )
    backwards = sum(1 for a, b in itertools.pairwise(records) if b.step <= a.step)
    if backwards:
        notes.append(
            f"the steps go back {backwards} time(s): several processes may have written this run (under DDP pass "
            "the wrapped model, or data_parallel=True, so that rank 0 alone writes) or the step counter was reset; "
            "onsets are read in file order"
        )
    notes.append(
        "to find the fix for a problem that began at a step, save a checkpoint there and run "
        "`gradcheck inspect CHECKPOINT --input BATCH`: it verifies fixes on a copy"
    )
    return notes


def _step_record(record: StepLog, assessment: Assessment) -> StepRecord:
    return StepRecord(
        step=record.step,
        loss=record.loss if record.loss is not None else math.nan,
        grad_norm=assessment.total_norm,
        attenuation=assessment.diagnosis.path.attenuation,
        gain=assessment.diagnosis.path.gain,
        layer_grad_norms=tuple(layer.grad.l2 if layer.grad is not None else math.nan for layer in record.layers),
    )


def _gain(assessment: Assessment) -> float | None:
    return assessment.diagnosis.path.gain


def _trend(points: Sequence[tuple[int, float | None]]) -> float | None:
    """Least-squares slope of log10(gain) against the step, per 1000 steps."""
    usable = [(s, math.log10(g)) for s, g in points if g is not None and g > 0 and math.isfinite(g)]
    if len(usable) < 3:
        return None
    xs = [s for s, _ in usable]
    ys = [y for _, y in usable]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def _two_digits(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return value
    digits = 1 - math.floor(math.log10(value))
    return round(value, digits)


def _empty_path() -> PathSummary:
    return PathSummary(measured_with="activation_gradients", length=0, attenuation=None, gain=None)


def _installed_torch() -> str:
    """The installed torch's version, read from its metadata: reading a history never imports torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "unknown"
