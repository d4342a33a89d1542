"""The terminal's per-step chart: the optimisation probe's steps or a training history's records.

One row per recorded step (thinned to ``MAX_ROWS`` for long runs, always keeping the first, every onset
and the last): loss, total gradient norm, attenuation and gain, with a log-scale bar of the total
gradient norm divided by the first record's on a log axis from 10^-6 to 10^+6 (``|`` marks 1×). Fits in
100 columns and reads without colour. For a training history the chart is the whole section: under the
table, the sentences of :mod:`gradcheck_cli.render.view` (each onset, the gain trend, the clipping norm).
"""

from __future__ import annotations

import io
import math

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.numbers import number
from gradcheck_cli.render.view import (
    MAX_ROWS,
    OPTIMIZER_NAMES,
    VERDICT_WORDS,
    Source,
    StepsView,
    clip_sentence,
    gain_sentence,
    healthy_sentence,
    history_head,
    onset_sentences,
    shown_rows,
    steps_view,
)
from gradcheck_cli.report.sections import OptimisationTrace, TrainingHistory

BAR_DECADES = 6
"""The bar spans 10^-6 … 10^+6 of the first record's total gradient norm."""
BAR_CELLS_PER_DECADE = 2


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
    if trace.loss:
        text.append(f"\nloss minimised: {trace.loss}", style="dim")
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
