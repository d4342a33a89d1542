"""The optimisation probe's per-step chart: loss, total gradient norm and gain, with a log-scale bar.

One row per recorded step (thinned to ``MAX_ROWS`` for long runs, always keeping the first step, the
onset and the last); the bar shows the total gradient norm divided by step 0's on a log axis from
10^-6 to 10^+6, with ``|`` marking 1× (step 0). Fits in 100 columns and reads without colour.
"""

from __future__ import annotations

import io
import math

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.numbers import number
from gradcheck_cli.report_sections import OptimisationTrace, StepRecord

MAX_ROWS = 20
BAR_DECADES = 6
"""The bar spans 10^-6 … 10^+6 of step 0's total gradient norm."""
BAR_CELLS_PER_DECADE = 2
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
VERDICT_WORDS = {
    "stable": "stable: the gradient stayed within 1e-3 … 1e3 of step 0's",
    "exploding": "exploding",
    "collapsing": "collapsing",
    "non_finite": "NaN/Inf",
}


def render_steps_chart(trace: OptimisationTrace, *, width: int = 100) -> str:
    """The chart as plain text (no colour), for files and tests."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False)
    console.print(steps_chart(trace))
    return buffer.getvalue()


def steps_chart(trace: OptimisationTrace) -> RenderableType:
    """The chart as one rich renderable; the caller's console decides about colour."""
    return Group(_header(trace), _table(trace), _verdict(trace))


def shown_rows(steps: tuple[StepRecord, ...], onset: int | None, limit: int = MAX_ROWS) -> list[int]:
    """Indices of the records to show: all of them up to ``limit``, else evenly spaced plus first, onset, last."""
    n = len(steps)
    if n <= limit:
        return list(range(n))
    keep = {0, n - 1}
    keep.update(i for i, r in enumerate(steps) if r.step == onset)
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


def _table(trace: OptimisationTrace) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("loss", justify="right", no_wrap=True)
    table.add_column("‖∂L/∂θ‖", justify="right", no_wrap=True)
    table.add_column("÷step 0", justify="right", no_wrap=True)
    table.add_column("atten.", justify="right", no_wrap=True)
    table.add_column("gain", justify="right", no_wrap=True)
    table.add_column(f"‖∂L/∂θ‖÷step 0, log ±{BAR_DECADES}", no_wrap=True)
    table.add_column("", no_wrap=True)
    if not trace.steps:
        return table
    reference = trace.steps[0].grad_norm
    unstable = trace.verdict != "stable" and trace.onset_step is not None
    for index in shown_rows(trace.steps, trace.onset_step):
        record = trace.steps[index]
        ratio = _ratio(record.grad_norm, reference)
        late = unstable and trace.onset_step is not None and record.step >= trace.onset_step
        style = "red" if late else "green"
        onset = unstable and record.step == trace.onset_step
        table.add_row(
            str(record.step),
            number(record.loss, ".3g"),
            number(record.grad_norm, ".2e"),
            number(ratio, ".2g"),
            number(record.attenuation, ".2g"),
            number(record.gain, ".2g"),
            _bar(ratio, record.grad_norm, style),
            Text("◀ onset", style="bold red") if onset else Text(""),
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
