"""GitHub Actions output: workflow commands that become annotations, and the step summary.

Errors become ``::error``, warnings ``::warning`` and info findings ``::notice`` annotations,
titled with the rule's code and name. A closing ``::notice`` gives the verdict; with a baseline,
layers worse than the baseline are ``::error``s, better layers and fixed findings ``::notice``s. The
recommendations follow in a collapsed log group. The CLI appends :func:`render_step_summary` to
``$GITHUB_STEP_SUMMARY`` when that is set; this module never touches the environment or files.
"""

from __future__ import annotations

import re

from gradcheck_cli.render.markdown import render_markdown
from gradcheck_cli.render.view import verdict
from gradcheck_cli.report.report import Finding, Report, Severity

COMMANDS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    """A command's message, escaped as the Actions runner unescapes it (``%``, CR, LF)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A command's property value (``title=…``): the message escapes plus ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, message: str, **properties: str) -> str:
    """One workflow command line, ``::name key=value,...::message``, escaped."""
    props = ",".join(f"{key}={escape_property(value)}" for key, value in properties.items())
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


def render_github(report: Report) -> str:
    """Workflow commands (annotations) for the report's findings, verdict and baseline diff."""
    lines = [_annotation(report, finding) for finding in report.findings]
    diff = report.baseline
    if diff is not None:
        for move in diff.worse_layers:
            lines.append(
                command(
                    "error",
                    f"layer {move.layer or '(root)'}: the gradient moved from {move.before:.3g} to {move.after:.3g} "
                    f"({move.orders:+.2f} orders of magnitude), beyond the tolerance of {diff.tolerance:g} against "
                    f"the baseline {diff.baseline}",
                    title="gradcheck baseline: worse layer",
                )
            )
        for move in diff.better_layers:
            lines.append(
                command(
                    "notice",
                    f"layer {move.layer or '(root)'}: the gradient moved from {move.before:.3g} to {move.after:.3g} "
                    f"({move.orders:+.2f} orders of magnitude), better than the baseline {diff.baseline}",
                    title="gradcheck baseline: better layer",
                )
            )
        for finding in diff.fixed_findings:
            lines.append(
                command("notice", f"fixed since the baseline: {finding.message}", title=f"{_title(finding)} (fixed)")
            )
    for note in report.notes:
        lines.append(command("notice", note, title="gradcheck note"))
    lines.append(command("notice", _verdict(report), title="gradcheck"))
    if report.recommendations:
        lines.append("::group::gradcheck recommendations (most likely fix first)")
        for rank, rec in enumerate(report.recommendations, start=1):
            lines.append(_plain(f"  {rank}. {rec.title} [{rec.id}]"))
            lines.append(_plain(f"     why: {' '.join(rec.why.split())}"))
            lines.extend(_plain(f"       {line}".rstrip()) for line in rec.snippet.splitlines())
        lines.append("::endgroup::")
    return "\n".join(lines) + "\n"


def render_step_summary(report: Report) -> str:
    """The Markdown to append to ``$GITHUB_STEP_SUMMARY``: the same report as a PR comment."""
    return render_markdown(report)


def _plain(line: str) -> str:
    """A log line that the runner cannot take for a command (it trims leading space before ``::``)."""
    stripped = line.lstrip()
    if stripped.startswith("::"):
        return line[: len(line) - len(stripped)] + ": :" + stripped[2:]
    return line


def _title(finding: Finding) -> str:
    return f"{finding.code} {finding.name}"


def _annotation(report: Report, finding: Finding) -> str:
    message = finding.message
    if finding.layer is not None and not re.search(rf"(?<![\w.]){re.escape(finding.layer)}(?![\w.])", message):
        message += f" (layer {finding.layer or '(root)'})"
    if report.baseline is not None:
        new = any(f.code == finding.code and f.layer == finding.layer for f in report.baseline.new_findings)
        message = ("new since the baseline: " if new else "already in the baseline: ") + message
    return command(COMMANDS[finding.severity], message, title=_title(finding))


def _verdict(report: Report) -> str:
    words = verdict(report)
    text = f"{words.word}: {words.summary}"
    if report.path.attenuation is not None:
        text += f" (input/output gradient {report.path.attenuation:.3g} over {report.path.length} calls)"
    if words.against_baseline is not None:
        text += f"; {words.against_baseline}"
    return text
