"""The per-step chart: the optimisation probe's steps or a training history's records.

One row per recorded step (thinned to ``MAX_ROWS`` for long runs, always keeping the first, every onset
and the last): loss, total gradient norm, attenuation and gain, with a log-scale bar of the total
gradient norm divided by the first record's on a log axis from 10^-6 to 10^+6 (``|`` marks 1×). Fits in
100 columns and reads without colour.

For a training history (``gradcheck history``) the chart is the whole section: under the table, one line
per problem's onset, the gain trend and the clipping norm the healthy records suggest. The plain-text
sentences are shared with the Markdown and HTML reports (:func:`history_head`, :func:`onset_sentences`...).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.numbers import number
from gradcheck_cli.report.sections import Onset, OptimisationTrace, StepRecord, TrainingHistory

MAX_ROWS = 20
BAR_DECADES = 6
"""The bar spans 10^-6 … 10^+6 of the first record's total gradient norm."""
BAR_CELLS_PER_DECADE = 2
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


def render_steps_chart(trace: Source, *, width: int = 100) -> str:
    """The chart as plain text (no colour), for files and tests."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False)
    console.print(steps_chart(trace))
    return buffer.getvalue()


def steps_chart(trace: Source) -> RenderableType:
    """The chart as one rich renderable; the caller's console decides about colour."""
    view = steps_view(trace)
    if isinstance(trace, TrainingHistory):
        return Group(_history_header(trace), _table(view), *_history_lines(trace))
    return Group(_header(trace), _table(view), _verdict(trace))


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


# ---------------------------------------------------------------- training history: shared sentences


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


def _without_step(message: str, step: int) -> str:
    prefix = f"step {step}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _positive(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _signed(value: float) -> str:
    return format(value, "+.2g").replace("-", "−")


# ---------------------------------------------------------------- rendering


def _header(trace: OptimisationTrace) -> Text:
    records = trace.steps
    last = records[-1].step if records else 0
    name = OPTIMIZER_NAMES.get(trace.optimizer, trace.optimizer)
    text = Text("optimisation probe: ", style="bold")
    text.append(
        f"{name}, lr {trace.lr:g}, on a copy of the model: {len(records)} record"
        f"{'' if len(records) == 1 else 's'}, steps 0…{last}"
    )
    if len(records) > MAX_ROWS:
        text.append(f"\nshowing {MAX_ROWS} of {len(records)} (first, onset and last kept)", style="dim")
    return text


def _history_header(history: TrainingHistory) -> Text:
    text = Text("training history: ", style="bold")
    text.append(f"{history_head(history)} (from {history.source})")
    if len(history.steps) > MAX_ROWS:
        text.append(f"\nshowing {MAX_ROWS} of {len(history.steps)} (first, onsets and last kept)", style="dim")
    return text


def _table(view: StepsView) -> Table:
    first = view.steps[0].step if view.steps else 0
    # a history's rows hold larger numbers (a blow-up's loss): one space between columns keeps 80 columns
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False, collapse_padding=view.training)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("‖∂L/∂θ‖", justify="right", no_wrap=True)
    table.add_column(f"÷step {first}", justify="right", no_wrap=True)
    table.add_column("atten.", justify="right", no_wrap=True)
    table.add_column("gain", justify="right", no_wrap=True)
    table.add_column(f"‖∂L/∂θ‖÷step {first}, log ±{BAR_DECADES}", no_wrap=True)
    table.add_column("", no_wrap=True)
    if not view.steps:
        return table
    reference = view.steps[0].grad_norm
    for index in shown_rows(view.steps, view.keep):
        record = view.steps[index]
        ratio = _ratio(record.grad_norm, reference)
        style = "red" if record.step in view.bad else "green"
        label = view.label(record.step)
        table.add_row(
            str(record.step),
            number(view.loss(record), ".3g"),
            number(record.grad_norm, ".2e"),
            number(ratio, ".2g"),
            number(record.attenuation, ".2g"),
            number(record.gain, ".2g"),
            _bar(ratio, record.grad_norm, style),
            Text(f"◀ {label}", style="bold red") if label else Text(""),
        )
    return table


def _ratio(value: float, reference: float) -> float | None:
    if not (math.isfinite(reference) and reference > 0) or math.isnan(value):
        return None
    return value / reference


def _bar(ratio: float | None, value: float, style: str) -> Text:
    cells = 2 * BAR_DECADES * BAR_CELLS_PER_DECADE + 1
    middle = BAR_DECADES * BAR_CELLS_PER_DECADE
    if ratio is None:
        nan = math.isnan(value)
        return Text(("nan" if nan else "?").center(cells), style="bold red" if nan else "dim")
    if ratio == 0:
        return Text("0".ljust(cells), style=style)
    decades = max(-BAR_DECADES, min(BAR_DECADES, math.log10(ratio))) if math.isfinite(ratio) else BAR_DECADES
    offset = round(decades * BAR_CELLS_PER_DECADE)
    line = [" "] * cells
    line[middle] = "|"
    low, high = sorted((middle, middle + offset))
    for i in range(low, high + 1):
        if i != middle:
            line[i] = "█"
    if not math.isfinite(ratio) or abs(math.log10(ratio)) > BAR_DECADES:  # off the scale
        line[0 if offset < 0 else cells - 1] = "<" if offset < 0 else ">"
    return Text("".join(line), style=style)


def _verdict(trace: OptimisationTrace) -> Text:
    if trace.verdict == "stable":
        return Text(f"✓ {VERDICT_WORDS['stable']}", style="bold green")
    word = VERDICT_WORDS.get(trace.verdict, trace.verdict)
    where = f" from step {trace.onset_step}" if trace.onset_step is not None else ""
    if trace.verdict == "non_finite":
        where = f" at step {trace.onset_step} (the run stopped there)" if trace.onset_step is not None else ""
    return Text(f"✗ {word}{where}", style="bold red")


def _history_lines(history: TrainingHistory) -> list[Text]:
    lines = [
        Text(f"⚠ {sentence}", style="yellow") if resolved else Text(f"✗ {sentence}", style="bold red")
        for resolved, sentence in onset_sentences(history)
    ]
    if not any(onset.resolved_step is None for onset in history.onsets):
        lines.append(Text(f"✓ {healthy_sentence(history)}", style="bold green"))
    gain = gain_sentence(history)
    if gain is not None:
        lines.append(Text(gain))
    clip = clip_sentence(history)
    if clip is not None:
        lines.append(Text(clip))
    return lines
