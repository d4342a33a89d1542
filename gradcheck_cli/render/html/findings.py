"""The page's findings, recommendations (with the effect each had on a copy of the model) and baseline."""

from __future__ import annotations

import math
from typing import Any

from gradcheck_cli.render.causes_text import verification_line
from gradcheck_cli.render.html.markup import SEVERITY_WORD, code, e, layer_ref, num, simple_table, ul
from gradcheck_cli.render.numbers import number
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, Recommendation, Report
from gradcheck_cli.report.sections import Verification

EVIDENCE_ITEMS = 12
"""Lists in a finding's evidence show at most this many items."""


def _evidence_value(value: Any) -> str:
    if isinstance(value, float):
        return number(value, ".3g")
    if isinstance(value, (list, tuple)):
        items = [_evidence_value(v) for v in value[:EVIDENCE_ITEMS]]
        more = f", … ({len(value) - EVIDENCE_ITEMS} more)" if len(value) > EVIDENCE_ITEMS else ""
        return ", ".join(items) + more
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_evidence_value(v)}" for k, v in value.items())
    if value is None:
        return "–"
    return str(value)


def _finding_row(finding: Finding, names: dict[str, int]) -> str:
    severity = SEVERITY_WORD[finding.severity]
    evidence = ""
    if finding.evidence:
        items = "".join(f"<dt>{e(k)}</dt><dd>{e(_evidence_value(v))}</dd>" for k, v in finding.evidence.items())
        evidence = f'<details class="evidence"><summary>evidence</summary><dl>{items}</dl></details>'
    return (
        f'<tr class="finding {severity}"><td><strong>{e(finding.code)}</strong></td>'
        f'<td><span class="sev {severity}">{e(severity)}</span></td>'
        f"<td>{e(finding.name)}</td><td>{layer_ref(finding.layer, names)}</td>"
        f"<td>{e(finding.message)}{evidence}</td></tr>"
    )


def findings_table(report: Report, names: dict[str, int]) -> str:
    rows = "".join(_finding_row(f, names) for f in report.findings)
    return (
        '<table class="findings"><thead><tr><th>code</th><th>severity</th><th>rule</th><th>layer</th>'
        f"<th>message</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def verifications(report: Report) -> dict[str, Verification]:
    return {v.id: v for v in report.verifications}


def verification_state(verification: Verification | None) -> tuple[str, str] | None:
    """(CSS class, badge text) for a recommendation's verification, or None without one."""
    if verification is None:
        return None
    if not verification.verified:
        return "unverified", "not verified"
    if verification.fixed:
        return "fixed", "fixed on a copy"
    if verification.effect is not None and verification.effect > 0:
        return "improved", "better on a copy, not fixed"
    return "unverified", "no better on a copy"


def _recommendation(rank: int, rec: Recommendation, verification: Verification | None) -> str:
    state = verification_state(verification)
    badge = f'<span class="badge {state[0]}">{e(state[1])}</span>' if state else ""
    parts = [
        f'<li id="rec-{rank}" class="rec" data-id="{e(rec.id)}">',
        f'<h3><span class="rank">{rank}.</span>{e(rec.title)} {code(rec.id)}{badge}</h3>',
        f"<p><strong>why:</strong> {e(rec.why)}</p>",
    ]
    line = verification_line(rec, verification)
    if line is not None and state is not None:
        effect = ""
        if verification is not None and verification.effect and math.isfinite(verification.effect):
            effect = f" <span class='muted'>({verification.effect:+.2g} orders of magnitude towards 1)</span>"
        parts.append(f'<p class="verification {state[0]}">{e(line.plain)}{effect}</p>')
    meta = []
    if rec.addresses:
        meta.append("addresses " + ", ".join(e(p.value) for p in rec.addresses))
    if rec.layers:
        shown = ", ".join(code(name or "(root)") for name in rec.layers[:8])
        more = f" and {len(rec.layers) - 8} more" if len(rec.layers) > 8 else ""
        meta.append(f"layers {shown}{more}")
    if meta:
        parts.append(f'<p class="muted">{" · ".join(meta)}</p>')
    parts.append(f'<pre><code class="language-python">{e(rec.snippet)}</code></pre>')
    parts.append("</li>")
    return "\n".join(parts)


def recommendation_list(report: Report) -> str:
    verified = verifications(report)
    order = "ordered by the effect verified on a copy of the model" if verified else "most likely fix first"
    items = "\n".join(
        _recommendation(rank, rec, verified.get(rec.id)) for rank, rec in enumerate(report.recommendations, start=1)
    )
    return f'<p class="muted">{e(order)}</p>\n<ol class="recs">\n{items}\n</ol>'


def _finding_items(findings: tuple[Finding, ...], names: dict[str, int]) -> str:
    return ul(
        f"<strong>{e(f.code)}</strong> {e(f.name)} "
        f'<span class="sev {SEVERITY_WORD[f.severity]}">{e(f.severity.value)}</span> '
        f"{layer_ref(f.layer, names)}: {e(f.message)}"
        for f in findings
    )


def _moves(moves: tuple[LayerMove, ...], names: dict[str, int]) -> str:
    return simple_table(
        [("layer", False), ("before", True), ("after", True), ("orders", True)],
        [[layer_ref(m.layer, names), num(m.before, ".2e"), num(m.after, ".2e"), num(m.orders, "+.2f")] for m in moves],
    )


def baseline_section(diff: BaselineDiff, names: dict[str, int]) -> str:
    tolerance = f"{diff.tolerance:g} order{'' if diff.tolerance == 1 else 's'} of magnitude"
    state = '<strong class="flag">regressed</strong>' if diff.regressed else "<strong>no regression</strong>"
    parts = [f"<p>baseline {code(diff.baseline)}, tolerance {e(tolerance)}: {state}</p>"]
    if diff.new_findings:
        parts += ["<h3>New findings</h3>", _finding_items(diff.new_findings, names)]
    if diff.fixed_findings:
        parts += ["<h3>Fixed findings</h3>", _finding_items(diff.fixed_findings, names)]
    if diff.worse_layers:
        parts += ["<h3>Worse layers</h3>", _moves(diff.worse_layers, names)]
    if diff.better_layers:
        parts += ["<h3>Better layers</h3>", _moves(diff.better_layers, names)]
    if not (diff.new_findings or diff.fixed_findings or diff.worse_layers or diff.better_layers):
        parts.append("<p>nothing changed beyond the tolerance</p>")
    return "\n".join(parts)
