"""The terminal report: per-layer table with log-scale bars, findings, recommendations, verdict."""

from __future__ import annotations

import io
import math

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.causes_text import causes, verification_line
from gradcheck_cli.render.numbers import count, number
from gradcheck_cli.render.steps_chart import steps_chart
from gradcheck_cli.render.view import (
    focus,
    forward_order,
    loss_range,
    measure_label,
    relative_gradients,
    unfollowed_path,
    verdict,
)
from gradcheck_cli.report.report import Report, Severity

TEXT_WIDTH = 110
"""Columns of the text report where no terminal says otherwise (``--output FILE``, standard output piped)."""
CODE_INDENT = "   "
"""A recommendation's snippet sits under its title, indented; it is never wrapped (see :func:`code_block`)."""
BAR_DECADES = 8
"""The bar spans 10^-8 … 10^+8 of the output-end gradient."""
BAR_CELLS_PER_DECADE = 0.75


def render_text(report: Report, *, width: int = TEXT_WIDTH) -> str:
    """The report as plain text (no colour), for ``--output FILE`` and golden tests; code lines are never cut
    or wrapped, even where they are longer than ``width``."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False, legacy_windows=False)
    console.print(text_report(report), crop=False)
    return buffer.getvalue()


def code_block(code: str, indent: str = CODE_INDENT) -> Text:
    """Code as the reader must copy it: each line whole, indented, never wrapped or cut (print it with
    ``crop=False``; a terminal narrower than a line folds it on screen, but a pipe or a file gets it whole)."""
    lines = "\n".join(indent + line if line else line for line in code.splitlines())
    return Text(lines, style="green", no_wrap=True, overflow="ignore")


def text_report(report: Report) -> RenderableType:
    """The whole report as one rich renderable; the caller's console decides about colour."""
    parts: list[RenderableType] = [_header(report)]
    if report.history is not None:  # the run over time first, then the record the table shows
        parts.append(steps_chart(report.history))
    parts += [_table(report), _path(report)]
    parts += causes(report)
    if report.optimisation is not None:
        parts.append(steps_chart(report.optimisation))
    if report.findings:
        parts.append(_findings(report))
    if report.recommendations:
        parts.append(_recommendations(report))
    if report.baseline is not None:
        parts.append(_baseline(report))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    parts.append(_verdict(report))
    return Group(*parts)


def _header(report: Report) -> Text:
    run = report.run
    text = Text()
    if report.history is not None:
        return _history_header(report)
    text.append("gradcheck ", style="bold")
    text.append(f"{run.model_type} ({count(run.parameters)} parameters) from {run.source} [{run.checkpoint_kind}]\n")
    text.append(f"mode {run.mode}, seed {run.seed}, device {run.device}; batch {run.batch} ({run.batch_source})\n")
    text.append(f"loss {run.loss_value:.4g}: {run.loss}")
    return text


def _history_header(report: Report) -> Text:
    run, history = report.run, report.history
    assert history is not None
    n = len(history.steps)
    text = Text()
    text.append("gradcheck ", style="bold")
    text.append(
        f"training history of {run.model_type} ({count(run.parameters)} parameters) from {run.source}: "
        f"{n} record{'' if n == 1 else 's'} every {history.every} step{'' if history.every == 1 else 's'}"
    )
    losses = loss_range(history)
    if losses is not None:
        (first, start), (last, end) = losses
        span = f"{start:.4g} at step {first}" + (f" → {end:.4g} at step {last}" if last != first else "")
        text.append(f"\nloss {span}: {run.loss}")
    elif history.steps:
        text.append("\nno loss recorded (pass it to step(loss) to record it)", style="dim")
    return text


def _table_title(report: Report) -> str:
    where = focus(report.history) if report.history is not None else None
    if where is None:
        return "gradient per layer, input end first"
    return f"gradient per layer at step {where[0]} ({where[1]}), input end first"


def _table(report: Report) -> Table:
    activation = report.path.measured_with == "activation_gradients"
    multi = any(layer.calls > 1 for layer in report.layers)
    table = Table(
        title=_table_title(report),
        title_justify="left",
        expand=False,
        box=None,
        header_style="bold",
        pad_edge=False,
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("layer", overflow="fold", min_width=12)
    table.add_column("type", overflow="ellipsis", min_width=6, max_width=12)
    if multi:
        table.add_column("calls", justify="right", no_wrap=True)
    table.add_column("∂L/∂h÷out" if activation else "g/w÷out", justify="right", no_wrap=True)
    table.add_column("log ±8", no_wrap=True)
    table.add_column("‖∂L/∂W‖", justify="right", no_wrap=True)
    table.add_column("flags", overflow="fold")
    relative = relative_gradients(report)
    for index in forward_order(report):
        layer = report.layers[index]
        rel = relative[index]
        style = "red" if layer.flags else ""
        row: list[str | Text] = [
            "–" if layer.position < 0 else str(layer.position),
            layer.name or "(root)",
            layer.type,
            *([str(layer.calls)] if multi else []),
            _num(rel),
            _bar(rel, style or "green"),
            _num(layer.grad_norm),
            Text(",".join(layer.flags), style="bold red") if layer.flags else Text(""),
        ]
        table.add_row(*row, style=style or None)
    return table


def _num(value: float | None) -> str:
    return number(value, ".1e")


def _bar(value: float | None, style: str) -> Text:
    cells = int(2 * BAR_DECADES * BAR_CELLS_PER_DECADE)
    if value is None or math.isnan(value):
        return Text("?".center(cells), style="dim")
    if value <= 0:
        return Text("0 underflow".ljust(cells), style=style)
    decades = max(-BAR_DECADES, min(BAR_DECADES, math.log10(value)))
    length = round((decades + BAR_DECADES) * BAR_CELLS_PER_DECADE)
    middle = cells // 2
    bar = Text("█" * length, style=style)
    if length <= middle:
        bar.append(" " * (middle - length))
        bar.append("|", style="dim")
        bar.append(" " * (cells - middle - 1))
    else:
        bar.append(" " * (cells - length))
    return bar


def _path(report: Report) -> Text:
    path = report.path
    text = Text()
    if path.attenuation is None:
        text.append(f"path: {unfollowed_path(report)}")
        return text
    what = measure_label(path.measured_with)
    text.append(f"path: {what} at the input end ({path.first_layer}) / output end ({path.last_layer}) = ")
    text.append(f"{path.attenuation:.3g}", style="bold")
    gain = "n/a" if path.gain is None else f"{path.gain:.3g}"
    text.append(f" over {path.length} calls, gain {gain} per layer")
    return text


def _findings(report: Report) -> Table:
    table = Table(title="findings", title_justify="left", box=None, header_style="bold", show_header=False)
    table.add_column("code", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("message", overflow="fold")
    colours = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}
    for finding in report.findings:
        table.add_row(
            finding.code,
            Text(finding.severity.value, style=colours[finding.severity]),
            f"{finding.name}: {finding.message}",
        )
    return table


def _recommendations(report: Report) -> Group:
    verified = {v.id: v for v in report.verifications}
    order = "ordered by the effect verified on a copy" if verified else "most likely fix first"
    parts: list[RenderableType] = [Text(f"recommendations ({order})", style="bold")]
    for rank, rec in enumerate(report.recommendations, start=1):
        head = Text(f"{rank}. {rec.title} ", style="bold")
        head.append(f"[{rec.id}]", style="cyan")
        parts.append(head)
        parts.append(Padding(Text(f"why: {rec.why}"), (0, 0, 0, 3)))
        line = verification_line(rec, verified.get(rec.id))
        if line is not None:
            parts.append(Padding(line, (0, 0, 0, 3)))
        parts.append(code_block(rec.snippet))
    return Group(*parts)


def _baseline(report: Report) -> Text:
    diff = report.baseline
    assert diff is not None
    text = Text(f"against baseline {diff.baseline} (tolerance {diff.tolerance:g} orders of magnitude): ", style="bold")
    text.append(
        f"{len(diff.new_findings)} new finding(s), {len(diff.fixed_findings)} fixed, "
        f"{len(diff.worse_layers)} layer(s) worse, {len(diff.better_layers)} better",
        style="bold red" if diff.regressed else "bold green",
    )
    for finding in diff.new_findings:
        text.append(f"\n  new    {finding.code} {finding.name}: {finding.layer or '(model)'}")
    for finding in diff.fixed_findings:
        text.append(f"\n  fixed  {finding.code} {finding.name}: {finding.layer or '(model)'}")
    for label, moves in (("worse ", diff.worse_layers), ("better", diff.better_layers)):
        for move in moves:
            text.append(f"\n  {label} {move.layer}: {move.before:.2e} → {move.after:.2e} ({move.orders:+.1f} orders)")
    return text


def _verdict(report: Report) -> Text:
    words = verdict(report)
    if words.healthy:
        text = Text(f"✓ healthy: {words.summary}", style="bold green")
    elif not words.measured:
        text = Text(f"? not measured: {words.summary}", style="bold yellow")
    else:
        since = f" (from step {words.onset_step})" if words.onset_step is not None else ""
        text = Text(f"✗ unhealthy: {words.summary}{since}", style="bold red")
    if words.against_baseline is not None:
        regressed = report.baseline is not None and report.baseline.regressed
        text.append(f"; {words.against_baseline}", style="bold red" if regressed else "bold green")
    return text
