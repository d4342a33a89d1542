"""What every renderer shows, computed once: the layers in forward order and each layer's gradient relative
to the output end (the number the text table, the Markdown table, the HTML page and the charts all draw), the
verdict's words, and of the optimisation probe or a training history the records shown and the sentences
that the terminal, Markdown and HTML reports share (:func:`history_head`, :func:`onset_sentences`...)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from gradcheck_cli.render.numbers import number
from gradcheck_cli.report.report import BaselineDiff, Report
from gradcheck_cli.report.sections import Onset, OptimisationTrace, StepRecord, TrainingHistory

MAX_ROWS = 20
"""A table of steps shows at most this many records (first, onsets and last kept)."""
ONSET_LAYERS = 5
"""An onset line names at most this many layers (the JSON report has up to 10)."""
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
VERDICT_WORDS = {
    "stable": "stable: the gradient stayed within 1e-3 … 1e3 of step 0's",
    "exploding": "exploding",
    "collapsing": "collapsing",
    "non_finite": "NaN/Inf",
}
PROBLEM_WORDS = {"vanishing": "vanishing", "exploding": "exploding", "non_finite": "NaN/Inf"}

Source = OptimisationTrace | TrainingHistory


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
    against_baseline: str | None = None
    """With ``--baseline``: what the comparison found and what the gate does with it, in words
    (:func:`baseline_sentence`); None without a baseline."""
    measured: bool = True
    """False when no problem was found but the gradient path could not be measured: no verdict of health."""

    @property
    def word(self) -> str:
        """``healthy``, ``not measured`` or ``unhealthy``: how every format heads the verdict."""
        return "healthy" if self.healthy else "unhealthy" if self.measured else "not measured"


NOT_MEASURED_SUMMARY = "the gradient path could not be measured (GC006), so this is no verdict of health"


def status_line(report: Report) -> str:
    """``healthy``, ``unhealthy: vanishing, exploding`` or ``not measured``: the verdict in a title's words."""
    if report.problems:
        return "unhealthy: " + ", ".join(p.value for p in report.problems)
    return "healthy" if report.measured else "not measured"


def verdict(report: Report) -> Verdict:
    """The verdict of ``report`` in words: healthy or the problems, and for a history since which step."""
    history = report.history
    problems = tuple(p.value for p in report.problems)
    against = None if report.baseline is None else baseline_sentence(report.baseline, len(report.findings))
    if not problems and not report.measured:
        return Verdict(False, (), NOT_MEASURED_SUMMARY, None, against, measured=False)
    if report.healthy:
        summary = "gradients flow from the output to the input"
        if history is not None:
            n = len(history.steps)
            summary = f"no problem at any of the {n} recorded step{'' if n == 1 else 's'}"
        return Verdict(True, (), summary, None, against)
    first = first_onset(history, problems) if history is not None else None
    return Verdict(False, problems, ", ".join(problems), None if first is None else first.step, against)


def baseline_sentence(diff: BaselineDiff, findings: int) -> str:
    """What ``--baseline`` found, for the verdict line: regressed (what is new or worse), or nothing new, and
    why the gate then passes although the model may still be unhealthy.

    ``findings``: how many findings the run has (all of them already in the baseline when nothing is new).
    """
    if diff.regressed:
        parts = []
        if diff.new_findings:
            parts.append(f"{_plural(len(diff.new_findings), 'new finding')}")
        if diff.worse_layers:
            parts.append(f"{_plural(len(diff.worse_layers), 'layer')} worse beyond the tolerance")
        return f"regressed against the baseline {diff.baseline}: {' and '.join(parts)}"
    if findings:
        held = "its finding was" if findings == 1 else f"all {findings} findings were"
        why = f"{held} already in the baseline and no layer got worse"
    else:
        why = "no finding and no layer worse than in the baseline"
    return f"nothing new against the baseline {diff.baseline} ({why}), so the gate passes"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def first_onset(history: TrainingHistory, problems: Iterable[str] | None = None) -> Onset | None:
    """The earliest onset, among ``problems`` when given (the report's problems: a repaired one may not count)."""
    wanted = None if problems is None else set(problems)
    chosen = [o for o in history.onsets if wanted is None or o.problem in wanted]
    return min(chosen, key=lambda o: o.step, default=None)


# ---------------------------------------------------------------- the optimisation probe and a training history


@dataclass(frozen=True)
class StepsView:
    """What the chart shows of either source: the records, the marked rows, the red rows."""

    steps: tuple[StepRecord, ...]
    marks: tuple[tuple[int, str], ...]
    """(recorded step, label): the rows marked ``◀ label`` (the onsets)."""
    bad: frozenset[int]
    """Recorded steps drawn red (after the probe's onset; a history's unhealthy records)."""
    no_loss: frozenset[int] = frozenset()
    """Recorded steps whose loss was not given (NaN in the record, shown as ``–``)."""
    training: bool = False
    """A training history (``gradcheck history``), not the optimisation probe."""
    keep: tuple[int, ...] = ()
    """Recorded steps that thinning keeps besides the first and the last (the marked ones, and the probe's
    onset step even when its verdict is stable)."""

    @property
    def marked(self) -> list[int]:
        return [step for step, _ in self.marks]

    def label(self, step: int) -> str | None:
        return next((label for at, label in self.marks if at == step), None)

    def loss(self, record: StepRecord) -> float | None:
        return None if record.step in self.no_loss else record.loss


def steps_view(source: Source) -> StepsView:
    """The chart's view of an optimisation probe or of a training history."""
    if isinstance(source, TrainingHistory):
        marks = tuple(history_marks(source))
        non_finite = {step for step, problems in source.problem_steps if "non_finite" in problems}
        return StepsView(
            steps=source.steps,
            marks=marks,
            bad=frozenset(step for step, _ in source.problem_steps),
            no_loss=frozenset(r.step for r in source.steps if math.isnan(r.loss) and r.step not in non_finite),
            training=True,
            keep=tuple(step for step, _ in marks),
        )
    unstable = source.verdict != "stable" and source.onset_step is not None
    onset = source.onset_step if unstable else None
    return StepsView(
        steps=source.steps,
        marks=((onset, "onset"),) if onset is not None else (),
        bad=frozenset(r.step for r in source.steps if onset is not None and r.step >= onset),
        keep=(source.onset_step,) if source.onset_step is not None else (),
    )


def shown_rows(steps: tuple[StepRecord, ...], onset: int | Iterable[int] | None, limit: int = MAX_ROWS) -> list[int]:
    """Indices of the records to show: all of them up to ``limit``, else evenly spaced plus first, onsets, last."""
    n = len(steps)
    if n <= limit:
        return list(range(n))
    wanted = {onset} if isinstance(onset, int) else set(onset or ())
    keep = {0, n - 1}
    keep.update(i for i, r in enumerate(steps) if r.step in wanted)
    spare = limit - len(keep)
    for k in range(1, spare + 1):
        if len(keep) >= limit:
            break
        keep.add(round(k * (n - 1) / (spare + 1)))
    index = 1
    while len(keep) < limit and index < n:  # rounding can land on a kept index; fill from the start
        keep.add(index)
        index += 1
    return sorted(keep)


def recorded_step(steps: tuple[StepRecord, ...], step: int) -> int | None:
    """The first recorded step at or after ``step`` (a NaN loss between two records shows in the next)."""
    return next((r.step for r in steps if r.step >= step), None)


def history_marks(history: TrainingHistory) -> list[tuple[int, str]]:
    """(recorded step, ``onset``) for each record where a problem began (the onset lines say which)."""
    steps = {recorded_step(history.steps, onset.step) for onset in history.onsets}
    return [(step, "onset") for step in sorted(s for s in steps if s is not None)]


def onset_problems(history: TrainingHistory, step: int) -> list[str]:
    """The problems (in words) whose onset shows in the record at ``step``."""
    return [
        PROBLEM_WORDS.get(o.problem, o.problem) for o in history.onsets if recorded_step(history.steps, o.step) == step
    ]


def history_head(history: TrainingHistory) -> str:
    """``8 records, steps 0…35, every 5``."""
    n = len(history.steps)
    if not n:
        return f"no record yet (every {history.every})"
    first, last = history.steps[0].step, history.steps[-1].step
    return f"{n} record{'' if n == 1 else 's'}, steps {first}…{last}, every {history.every}"


def loss_range(history: TrainingHistory) -> tuple[tuple[int, float], tuple[int, float]] | None:
    """(step, loss) of the first and the last record with a loss (NaN counts where the record says NaN/Inf)."""
    view = steps_view(history)
    given = [(r.step, value) for r in history.steps if (value := view.loss(r)) is not None]
    return (given[0], given[-1]) if given else None


def focus(history: TrainingHistory) -> tuple[int, str] | None:
    """The step whose layers the report's table shows, and why: the first unhealthy record, else the last."""
    if history.problem_steps:
        return history.problem_steps[0][0], "first problem"
    if history.steps:
        return history.steps[-1].step, "last record"
    return None


def onset_sentence(onset: Onset) -> str:
    """``exploding from step 25 (last healthy record: step 20) — GC016 the total …; layers: 12``."""
    word = PROBLEM_WORDS.get(onset.problem, onset.problem)
    before = (
        f"last healthy record: step {onset.last_healthy_step}"
        if onset.last_healthy_step is not None
        else "no healthy record before it"
    )
    text = f"{word} from step {onset.step} ({before})"
    message = _without_step(onset.message, onset.step)
    detail = " ".join(part for part in (", ".join(onset.codes), message) if part)
    if detail:
        text += f" — {detail}"
    if onset.layers:
        shown = ", ".join(name or "(root)" for name in onset.layers[:ONSET_LAYERS])
        more = len(onset.layers) - ONSET_LAYERS
        text += f"; layers: {shown}" + (f" (+{more} more)" if more > 0 else "")
    if onset.resolved_step is not None:
        text += f"; resolved: no record from step {onset.resolved_step} on shows it"
    return text


def onset_sentences(history: TrainingHistory) -> list[tuple[bool, str]]:
    """(resolved, sentence) per onset, in onset order."""
    return [(onset.resolved_step is not None, onset_sentence(onset)) for onset in history.onsets]


def healthy_sentence(history: TrainingHistory) -> str:
    """``healthy at all 20 records (steps 0…190)``, or since the last unhealthy record when a problem resolved."""
    n = len(history.steps)
    if not n:
        return "no record to judge yet"
    if history.problem_steps:
        last_bad = history.problem_steps[-1][0]
        after = [r.step for r in history.steps if r.step > last_bad]
        if not after:
            return f"unhealthy up to the last record (step {last_bad})"
        k = len(after)
        return f"healthy from step {after[0]} on ({k} record{'' if k == 1 else 's'}, steps {after[0]}…{after[-1]})"
    return f"healthy at all {n} record{'' if n == 1 else 's'} (steps {history.steps[0].step}…{history.steps[-1].step})"


def gain_sentence(history: TrainingHistory) -> str | None:
    """``gain per layer 0.512 at step 0 → 0.503 at step 20; trend −0.32 decades per 1000 steps …``."""
    gains = [(r.step, r.gain) for r in history.steps if _positive(r.gain)]
    if not gains:
        return None
    first_problem = min((o.step for o in history.onsets), default=None)
    unhealthy = {step for step, _ in history.problem_steps}
    healthy = [
        (step, gain)
        for step, gain in gains
        if step not in unhealthy and (first_problem is None or step < first_problem)
    ]
    start = (history.steps[0].step, history.gain_first) if _positive(history.gain_first) else gains[0]
    text = f"gain per layer {number(start[1], '.3g')} at step {start[0]}"
    end = healthy[-1] if healthy else None
    if end is not None and end[0] != start[0]:
        text += f" → {number(end[1], '.3g')} at step {end[0]}"
    last = history.steps[-1]
    if history.onsets and _positive(history.gain_last) and (end is None or last.step != end[0]):
        text += f" ({number(history.gain_last, '.3g')} at the last record, step {last.step})"
    if history.gain_trend is not None:
        count = len(healthy)
        text += (
            f"; trend {_signed(history.gain_trend)} decades per 1000 steps over the {count} healthy "
            f"record{'' if count == 1 else 's'}" + (" before the first problem" if history.onsets else "")
        )
    else:
        text += "; no trend (it needs 3 healthy records with a gain)"
    return text


def clip_sentence(history: TrainingHistory) -> str | None:
    """``clip_grad_norm_ max_norm 0.15: 2× the median total norm 0.0761 of the healthy records (max 0.341)``."""
    if history.clip_max_norm is None:
        return None
    median = number(history.healthy_norm_median, ".3g")
    top = number(history.healthy_norm_max, ".3g")
    where = " before the first problem" if history.onsets else ""
    return (
        f"clip_grad_norm_ max_norm {history.clip_max_norm:g}: 2× the median total gradient norm {median} of the "
        f"healthy records{where} (max {top})"
    )


def trace_verdict(trace: Source) -> str:
    """``stable``, ``exploding from step 3``; a history: ``healthy`` or each onset's problems and step."""
    if isinstance(trace, TrainingHistory):
        if not trace.onsets:
            return "healthy"
        by_step: dict[int, list[str]] = {}
        for onset in trace.onsets:
            word = PROBLEM_WORDS.get(onset.problem, onset.problem)
            if onset.resolved_step is not None:
                word += f" (until step {onset.resolved_step})"
            by_step.setdefault(onset.step, []).append(word)
        return "; ".join(f"{', '.join(words)} from step {step}" for step, words in sorted(by_step.items()))
    if trace.verdict == "stable":
        return "stable"
    where = f" from step {trace.onset_step}" if trace.onset_step is not None else ""
    return {"non_finite": "NaN/Inf"}.get(trace.verdict, trace.verdict) + where


def _without_step(message: str, step: int) -> str:
    prefix = f"step {step}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _signed(value: float) -> str:
    return format(value, "+.2g").replace("-", "−")


# ---------------------------------------------------------------- the gradient through time


@dataclass(frozen=True)
class ThroughTime:
    """A layer's gradient through time: per call of a module that ran several times (an ``nn.RNNCell`` in a
    loop, a shared block), ‖∂L/∂h‖ ÷ the output end's; per time step of a fused ``nn.RNN``/``LSTM``/``GRU``,
    ‖∂L/∂x_t‖ ÷ the last step's."""

    index: int
    """Index into ``report.layers``."""
    values: tuple[float, ...]
    """In forward order: the first call (time step) is the farthest from the loss."""
    unit: str
    """``call`` or ``time step``."""


def through_time(report: Report) -> list[ThroughTime]:
    """The layers with a gradient through time, in forward order."""
    out_end = _output_norm(report)
    series = []
    for i in forward_order(report):
        layer = report.layers[i]
        if out_end and len(layer.act_grad_norms) > 1:
            series.append(ThroughTime(i, tuple(v / out_end for v in layer.act_grad_norms), "call"))
        elif len(layer.time_grad_norms) > 1:
            last = layer.time_grad_norms[-1]
            if math.isfinite(last) and last > 0:
                series.append(ThroughTime(i, tuple(v / last for v in layer.time_grad_norms), "time step"))
    return series


def _output_norm(report: Report) -> float | None:
    """‖∂L/∂h‖ at the output end, recovered from any layer's norm and relative value."""
    for layer in report.layers:
        act, rel = layer.act_grad_norm, layer.act_grad_rel
        if act is not None and rel is not None and math.isfinite(act) and act > 0 and rel > 0 and math.isfinite(rel):
            return act / rel
    return None


MEASURE_LABELS = {
    "activation_gradients": "activation gradient",
    "bias_gradients": "bias gradient (the output gradient summed over the batch)",
    "parameter_gradients": "parameter gradient ratio",
    "not_measured": "not measured (no hook and no bias shows the path)",
}


def unfollowed_path(report: Report) -> str:
    """Why the report has no path (no attenuation), in words: not measured, or too few finite measurements."""
    if not report.measured:
        return "not measured: no module hook fires on this program and fewer than two layers have a bias to read it"
    return "the gradient could not be followed from output to input (too few finite measurements)"


def measure_label(measured_with: str) -> str:
    """What the path's numbers are, in words, for every renderer."""
    return MEASURE_LABELS.get(measured_with, measured_with.replace("_", " "))
