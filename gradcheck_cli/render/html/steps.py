"""The page's per-step sections: the optimisation probe, and a training history (``gradcheck history``)."""

from __future__ import annotations

import math

from gradcheck_cli.render.html.figures import history_points, steps_chart_svg
from gradcheck_cli.render.html.markup import code, e, num, plural, simple_table, ul
from gradcheck_cli.render.view import (
    MAX_ROWS,
    OPTIMIZER_NAMES,
    VERDICT_WORDS,
    clip_sentence,
    gain_sentence,
    healthy_sentence,
    history_head,
    onset_problems,
    onset_sentences,
    steps_view,
)
from gradcheck_cli.report.sections import OptimisationTrace, TrainingHistory


def optimisation_section(trace: OptimisationTrace) -> str:
    """The optimisation probe: its verdict, the chart of its steps, every step in a table."""
    records = trace.steps
    name = OPTIMIZER_NAMES.get(trace.optimizer, trace.optimizer)
    last = records[-1].step if records else 0
    head = (
        f"{name}, lr {trace.lr:g}, on a copy of the model, on the sample batch: {len(records)} records, steps 0…{last}"
    )
    if trace.loss:
        head += f"; loss minimised: {trace.loss}"
    if trace.verdict == "stable":
        verdict = f'<p class="verification fixed"><strong>✓ {e(VERDICT_WORDS["stable"])}</strong></p>'
    else:
        where = f" from step {trace.onset_step}" if trace.onset_step is not None else ""
        if trace.verdict == "non_finite" and trace.onset_step is not None:
            where = f" at step {trace.onset_step} (the run stopped there)"
        word = VERDICT_WORDS.get(trace.verdict, trace.verdict)
        verdict = f'<p class="flag">✗ {e(word + where)}</p>'
    reference = records[0].grad_norm if records else math.nan
    rows = [
        [
            str(r.step),
            num(r.loss, ".4g"),
            num(r.grad_norm, ".3e"),
            num(r.grad_norm / reference if math.isfinite(reference) and reference > 0 else None, ".3g"),
            num(r.attenuation, ".3g"),
            num(r.gain, ".3g"),
        ]
        for r in records
    ]
    late = [
        "flagged" if trace.verdict != "stable" and trace.onset_step is not None and r.step >= trace.onset_step else ""
        for r in records
    ]
    table = simple_table(
        [("step", True), ("loss", True), ("‖∂L/∂θ‖", True), ("÷ step 0", True), ("attenuation", True), ("gain", True)],
        rows,
        late,
    )
    return (
        f"<p>{e(head)}</p>\n{verdict}\n<figure>{steps_chart_svg(trace)}"
        "<figcaption>total gradient norm per optimiser step divided by step 0's; the run is stable while it "
        "stays within 10^-3 … 10^3 of step 0's</figcaption></figure>\n"
        f"<details><summary>every step</summary>{table}</details>"
    )


def history_section(history: TrainingHistory) -> str:
    """A training history: each onset, the chart of its records, the gain and clipping sentences, the table."""
    view = steps_view(history)
    shown = history_points(history)
    first = history.steps[0] if history.steps else None
    head = f"<p>{e(history_head(history))}, from {code(history.source)}</p>"
    items = [
        f'<span class="verification improved">⚠</span> {e(sentence)}'
        if resolved
        else f'<span class="flag">✗</span> {e(sentence)}'
        for resolved, sentence in onset_sentences(history)
    ]
    verdict = ul(items, "onsets") if items else ""
    if not any(onset.resolved_step is None for onset in history.onsets):
        verdict += f'<p class="verification fixed"><strong>✓ {e(healthy_sentence(history))}</strong></p>'
    more = [s for s in (gain_sentence(history), clip_sentence(history)) if s is not None]
    trend = "".join(f"<p>{e(s)}</p>" for s in more)
    if first is None:
        return f"{head}\n{verdict}\n{trend}"
    reference = first.grad_norm
    rows, classes = [], []
    for index in shown:
        record = history.steps[index]
        usable = math.isfinite(reference) and reference > 0 and not math.isnan(record.grad_norm)
        mark = ""
        if view.label(record.step):
            mark = f'<span class="flag">◀ onset: {e(", ".join(onset_problems(history, record.step)))}</span>'
        rows.append(
            [
                str(record.step),
                num(view.loss(record), ".4g"),
                num(record.grad_norm, ".3e"),
                num(record.grad_norm / reference if usable else None, ".3g"),
                num(record.attenuation, ".3g"),
                num(record.gain, ".3g"),
                mark,
            ]
        )
        classes.append("flagged" if record.step in view.bad else "")
    table = simple_table(
        [
            ("step", True),
            ("loss", True),
            ("‖∂L/∂θ‖", True),
            (f"÷ step {first.step}", True),
            ("attenuation", True),
            ("gain per layer", True),
            ("", False),
        ],
        rows,
        classes,
    )
    n = len(history.steps)
    summary = f"{plural(n, 'record')}" + (
        f", {len(shown)} shown (first, onsets and last kept; the JSON report has every one)" if len(shown) < n else ""
    )
    caption = f"total gradient norm ‖∂L/∂θ‖ of each recorded step divided by step {first.step}'s, log scale" + (
        "; unhealthy records in red, each onset a dashed line" if history.onsets else ""
    )
    if len(shown) < n:
        caption += f"; {len(shown)} of the {n} records drawn (first, onsets and last kept)"
    caption += ". Hover a point for its numbers."
    open_ = " open" if len(shown) <= MAX_ROWS else ""
    return (
        f"{head}\n{verdict}\n<figure>{steps_chart_svg(history, shown)}<figcaption>{e(caption)}</figcaption></figure>\n"
        f"{trend}\n<details{open_}><summary>{e(summary)}</summary>{table}</details>"
    )
