"""The Markdown report, for pull-request comments and the GitHub step summary."""

from __future__ import annotations

import math
import re

from gradcheck_cli.render.causes_text import cause_lines, verification_line
from gradcheck_cli.render.numbers import count, number
from gradcheck_cli.render.view import (
    MAX_ROWS,
    clip_sentence,
    focus,
    gain_sentence,
    healthy_sentence,
    history_head,
    loss_range,
    measure_label,
    onset_problems,
    onset_sentences,
    relative_gradients,
    shown_rows,
    steps_view,
    unfollowed_path,
    verdict,
)
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, LayerStats, Report, Severity
from gradcheck_cli.report.sections import TrainingHistory

MAX_FLAGGED_ROWS = 30
"""A PR comment lists at most this many flagged layers; the JSON report has them all."""
WORST_ROWS = 10
"""With nothing flagged, the table shows the layers furthest from the output's gradient."""

_ICON = {Severity.ERROR: "❌", Severity.WARNING: "⚠️", Severity.INFO: "ℹ️"}
_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


def render_markdown(report: Report) -> str:
    """The whole report as GitHub-flavoured Markdown, ending with a newline."""
    parts = [_verdict(report), _run(report)]
    if report.history is not None:
        parts.append(_history(report.history))
    parts += [_path(report), _layers(report), _causes(report)]
    if report.findings:
        parts.append(_findings(report.findings))
    if report.baseline is not None:
        parts.append(_baseline(report.baseline))
    if report.recommendations:
        parts.append(_recommendations(report))
    if report.notes:
        parts.append("\n".join(f"> **note:** {_escape(note)}  " for note in report.notes).rstrip())
    return "\n\n".join(part for part in parts if part) + "\n"


def _escape(text: str) -> str:
    """Text with Markdown's active characters backslash-escaped, on one line."""
    return _SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _code(text: str) -> str:
    """An inline code span that survives backticks inside ``text``."""
    text = " ".join(text.splitlines()) or " "
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _orders(tolerance: float) -> str:
    return f"{tolerance:g} order{'' if tolerance == 1 else 's'} of magnitude"


def _cell(name: str) -> str:
    """A layer name as code inside a table cell, where a pipe would end the cell even in code."""
    return _code(name or "(root)").replace("|", "\\|")


def _fmt(value: float | None, spec: str = ".3g") -> str:
    """A number for prose and tables; ``–`` for a missing one."""
    return number(value, spec)


def _verdict(report: Report) -> str:
    words = verdict(report)
    mark = {"healthy": "✅", "not measured": "⚠️"}.get(words.word, "❌")
    head = f"## gradcheck: {mark} {words.word}"
    tail = words.summary + (f" from step {words.onset_step}" if words.onset_step is not None else "")
    counts = [
        f"{n} {severity.value}{'s' if n != 1 and severity is not Severity.INFO else ''}"
        for severity in (Severity.ERROR, Severity.WARNING, Severity.INFO)
        if (n := sum(f.severity is severity for f in report.findings))
    ]
    line = f"{head} — {tail}"
    if counts:
        line += f" ({', '.join(counts)})"
    if words.against_baseline is not None:
        against = _escape(words.against_baseline)
        line += "; " + (
            f"**regressed**{against.removeprefix('regressed')}" if against.startswith("regressed") else against
        )
    return line


def _run(report: Report) -> str:
    run = report.run
    if report.history is not None:
        history = report.history
        n = len(history.steps)
        losses = loss_range(history)
        if losses is not None:
            (first, start), (last, end) = losses
            span = f"{_fmt(start, '.4g')} at step {first}" + (
                f" → {_fmt(end, '.4g')} at step {last}" if last != first else ""
            )
            loss = f"loss {span}: {_escape(run.loss)}"
        else:
            loss = "no loss recorded (pass it to `step(loss)` to record it)"
        return (
            f"**{_escape(run.model_type)}** ({count(run.parameters)} parameters): training history from "
            f"{_code(run.source)} · {n} record{'' if n == 1 else 's'} every {history.every} "
            f"step{'' if history.every == 1 else 's'}  \n{loss}"
        )
    return (
        f"**{_escape(run.model_type)}** ({count(run.parameters)} parameters) from {_code(run.source)} "
        f"[{_escape(run.checkpoint_kind)}] · mode {_escape(run.mode)} · seed {run.seed} "
        f"· device {_escape(run.device)}  \n"
        f"batch {_escape(run.batch)} ({_escape(run.batch_source)})  \n"
        f"loss {_fmt(run.loss_value, '.4g')}: {_escape(run.loss)}"
    )


def _path(report: Report) -> str:
    path = report.path
    if path.attenuation is None:
        return f"**path:** {unfollowed_path(report)}"
    what = measure_label(path.measured_with)
    first = _code(path.first_layer or "?")
    last = _code(path.last_layer or "?")
    return (
        f"**path:** {what} at the input end ({first}) ÷ output end ({last}) = **{_fmt(path.attenuation)}** "
        f"over {path.length} calls, gain {_fmt(path.gain)} per layer"
    )


def _relative(report: Report) -> dict[str, float | None]:
    """Each layer's gradient relative to the output end, by name (render/view.py)."""
    return {report.layers[i].name: value for i, value in relative_gradients(report).items()}


def _forward(layers: tuple[LayerStats, ...]) -> list[LayerStats]:
    return sorted(layers, key=lambda layer: (layer.position < 0, layer.position))


def _distance(value: float | None) -> float:
    """How far a relative gradient is from the output's, in decades (missing: nowhere)."""
    if value is None:
        return -1.0
    if value <= 0 or not math.isfinite(value):
        return math.inf
    return abs(math.log10(value))


def _layers(report: Report) -> str:
    rel = _relative(report)
    flagged = [layer for layer in _forward(report.layers) if layer.flags]
    where = focus(report.history) if report.history is not None else None
    at = f" at step {where[0]}, the {where[1]}" if where is not None else ""
    if flagged:
        title = f"### Flagged layers{at} ({len(flagged)})"
        rows = flagged[:MAX_FLAGGED_ROWS]
        more = len(flagged) - len(rows)
    else:
        ranked = sorted(report.layers, key=lambda layer: -_distance(rel.get(layer.name)))
        rows = [layer for layer in ranked if rel.get(layer.name) is not None][:WORST_ROWS]
        title = f"### Layers furthest from the output's gradient{at} ({len(rows)} worst, none flagged)"
        more = 0
    if not rows:
        return f"{title}\n\nno layer with a measured gradient"
    column = "∂L/∂h ÷ out" if report.path.measured_with == "activation_gradients" else "g/w ÷ out"
    lines = [
        title,
        "",
        f"| # | layer | type | {column} | ‖∂L/∂W‖ | flags |",
        "|--:|---|---|--:|--:|---|",
    ]
    for layer in rows:
        position = "–" if layer.position < 0 else str(layer.position)
        lines.append(
            f"| {position} | {_cell(layer.name)} | {_escape(layer.type)} | {_fmt(rel.get(layer.name), '.1e')} "
            f"| {_fmt(layer.grad_norm, '.1e')} | {_escape(', '.join(layer.flags))} |"
        )
    if more:
        lines.append(f"\n… and {more} more flagged layers (all of them are in the JSON report)")
    return "\n".join(lines)


def _finding_line(finding: Finding, icon: str | None = None) -> str:
    where = f" · layer {_code(finding.layer or '(root)')}" if finding.layer is not None else ""
    return (
        f"- {icon or _ICON[finding.severity]} **{finding.code}** {finding.name} ({finding.severity.value}){where}: "
        f"{_escape(finding.message)}"
    )


def _findings(findings: tuple[Finding, ...]) -> str:
    return "### Findings\n\n" + "\n".join(_finding_line(f) for f in findings)


def _baseline(diff: BaselineDiff) -> str:
    state = "**regressed**" if diff.regressed else "no regression"
    lines = [
        "### Against the baseline",
        "",
        f"baseline {_code(diff.baseline)}, tolerance {_orders(diff.tolerance)}: {state}",
    ]
    if diff.new_findings:
        lines += ["", "**New findings**", "", *(_finding_line(f) for f in diff.new_findings)]
    if diff.fixed_findings:
        lines += ["", "**Fixed findings**", "", *(_finding_line(f, icon="✅") for f in diff.fixed_findings)]
    for title, moves in (("Worse layers", diff.worse_layers), ("Better layers", diff.better_layers)):
        if moves:
            lines += ["", f"**{title}**", "", *_moves(moves)]
    if not (diff.new_findings or diff.fixed_findings or diff.worse_layers or diff.better_layers):
        lines += ["", "nothing changed beyond the tolerance"]
    return "\n".join(lines)


def _moves(moves: tuple[LayerMove, ...]) -> list[str]:
    rows = ["| layer | before | after | orders |", "|---|--:|--:|--:|"]
    for move in moves:
        rows.append(
            f"| {_cell(move.layer)} | {_fmt(move.before, '.2e')} | {_fmt(move.after, '.2e')} "
            f"| {_fmt(move.orders, '+.2f')} |"
        )
    return rows


def _causes(report: Report) -> str:
    lines = cause_lines(report)
    if not lines:
        return ""
    items = [f"- {_escape(line).replace(chr(10), '  ' + chr(10) + '  ')}" for line in lines]
    return "\n".join(["### Causes", "", *items])


def _recommendations(report: Report) -> str:
    verified = {v.id: v for v in report.verifications}
    order = "ordered by the effect verified on a copy" if verified else "most likely fix first"
    lines = [f"### Recommendations ({order})"]
    for rank, rec in enumerate(report.recommendations, start=1):
        fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", rec.snippet)), default=0) + 1)
        line = verification_line(rec, verified.get(rec.id))
        lines += [
            "",
            f"{rank}. **{_escape(rec.title)}** ({_code(rec.id)})  ",
            f"   why: {_escape(rec.why)}" + ("  " if line is not None else ""),
            *([f"   {_escape(line.plain)}"] if line is not None else []),
            "",
            f"   {fence}python",
            *(f"   {line}".rstrip() for line in rec.snippet.splitlines()),
            f"   {fence}",
        ]
    return "\n".join(lines)


def _history(history: TrainingHistory) -> str:
    """The recorded steps as a table (thinned like the terminal's, onsets marked), the onsets, the trend."""
    view = steps_view(history)
    lines = ["### Training history", "", f"{_escape(history_head(history))} (from {_code(history.source)})"]
    if history.steps:
        rows = shown_rows(history.steps, view.keep)
        first = history.steps[0]
        lines += [
            "",
            f"| step | loss | ‖∂L/∂θ‖ | ÷ step {first.step} | attenuation | gain per layer | |",
            "|--:|--:|--:|--:|--:|--:|---|",
        ]
        reference = first.grad_norm
        for index in rows:
            record = history.steps[index]
            usable = math.isfinite(reference) and reference > 0 and not math.isnan(record.grad_norm)
            ratio = record.grad_norm / reference if usable else None
            mark = ""
            if view.label(record.step):
                mark = "◀ **onset**: " + _escape(", ".join(onset_problems(history, record.step)))
            elif record.step in view.bad:
                mark = "✗"
            lines.append(
                f"| {record.step} | {_fmt(view.loss(record), '.4g')} | {_fmt(record.grad_norm, '.3e')} "
                f"| {_fmt(ratio, '.3g')} | {_fmt(record.attenuation, '.3g')} | {_fmt(record.gain, '.3g')} | {mark} |"
            )
        if len(rows) < len(history.steps):
            lines += [
                "",
                f"showing {len(rows)} of {len(history.steps)} records (first, onsets and last kept; "
                f"at most {MAX_ROWS}); the JSON report has every one",
            ]
    lines.append("")
    lines += [f"- {'⚠️' if resolved else '❌'} {_escape(sentence)}" for resolved, sentence in onset_sentences(history)]
    if not any(onset.resolved_step is None for onset in history.onsets):
        lines.append(f"- ✅ {_escape(healthy_sentence(history))}")
    for sentence in (gain_sentence(history), clip_sentence(history)):
        if sentence is not None:
            lines.append(f"- {_escape(sentence)}")
    return "\n".join(lines)
