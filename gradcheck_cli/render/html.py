"""The HTML report: one self-contained page for CI artifacts (``--format html --output report.html``).

Everything is inline: the CSS, the SVG charts (:mod:`gradcheck_cli.render.svg_chart`) and a small
script that makes the layer table sortable. Nothing is fetched (a Content-Security-Policy meta tag
forbids it, and allows only that one script by its hash); the page reads the same without JS
(the table then stays in forward order, grouped by block) and prints. Every string that comes from
the model or the report goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterable
from html import escape
from importlib import resources
from typing import Any

from gradcheck_cli.render.causes_text import cause_lines, verification_line
from gradcheck_cli.render.numbers import count, number
from gradcheck_cli.render.steps_chart import (
    MAX_ROWS,
    OPTIMIZER_NAMES,
    PROBLEM_WORDS,
    VERDICT_WORDS,
    clip_sentence,
    focus,
    gain_sentence,
    healthy_sentence,
    history_head,
    loss_range,
    onset_problems,
    onset_sentences,
    steps_view,
)
from gradcheck_cli.render.svg_chart import (
    chart_points,
    history_chart_svg,
    history_points,
    layer_chart_svg,
    steps_chart_svg,
    through_time,
    time_chart_svg,
)
from gradcheck_cli.render.view import first_onset, forward_order, relative_gradients, verdict
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, LayerStats, Recommendation, Report, Severity
from gradcheck_cli.report.sections import OptimisationTrace, TrainingHistory, Verification

BAR_DECADES = 8
"""The table's bars span 10^-8 … 10^+8 of the output end's gradient, like the terminal's."""
MAX_TIME_CHARTS = 4
"""Layers that run several times (or fused RNNs) get a through-time chart each, at most this many."""
OPEN_ROWS = 12
"""A cause's table starts open when it flags at most this many rows (its head line already counts them)."""
EVIDENCE_ITEMS = 12
"""Lists in a finding's evidence show at most this many items."""


def _asset(name: str) -> str:
    """A file of ``gradcheck_cli/render/assets`` as text (shipped as package data)."""
    return (resources.files("gradcheck_cli.render") / "assets" / name).read_text(encoding="utf-8")


_NUMERIC = ' class="n"'
_SEVERITY_WORD = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "info"}
_BLOCK = re.compile(r"^(.*?\.\d+)\.")
"""The block a layer belongs to: its name up to the first numbered component that has children."""

CSS = _asset("report.css")
"""The page's style sheet (package data: ``render/assets/report.css``), inlined so the page loads nothing."""
SCRIPT = _asset("report.js")
"""The page's one script (``render/assets/report.js``): table sorting, open details when printing."""


def script_hash() -> str:
    """The CSP source that allows exactly the page's one script (``'sha256-…'``)."""
    digest = hashlib.sha256(SCRIPT.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def render_html(report: Report) -> str:
    """The whole report as one self-contained HTML5 page, ending with a newline."""
    names = _anchors(report)
    where = focus(report.history) if report.history is not None else None
    at = f" at step {where[0]} ({where[1]})" if where is not None else ""
    sections = [
        ("run", "Run", _run(report)),
        ("notes", "Notes", _notes(report.notes) if report.notes else ""),
        ("history", "Training history", _history(report.history) if report.history is not None else ""),
        ("chart", f"Gradient along the path{at}", _chart(report)),
        ("findings", "Findings", _findings(report, names) if report.findings else ""),
        ("recommendations", "Recommendations", _recommendations(report) if report.recommendations else ""),
        ("causes", "Causes", _causes(report)),
        ("optimisation", "Optimisation probe", _optimisation(report.optimisation) if report.optimisation else ""),
        ("baseline", "Against the baseline", _baseline(report.baseline, names) if report.baseline else ""),
        ("layers", f"Layers{at}", _layers(report)),
    ]
    present = [(anchor, title, body) for anchor, title, body in sections if body]
    nav = " ".join(f'<a href="#{anchor}">{escape(title)}</a>' for anchor, title, _ in present)
    body = "\n".join(
        f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n{content}\n</section>'
        for anchor, title, content in present
    )
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src {script_hash()}"
    status = "healthy" if report.healthy else "unhealthy: " + ", ".join(p.value for p in report.problems)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="gradcheck">\n'
        f"<title>{escape(f'gradcheck: {status} — {report.run.model_type}')}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n"
        f"{_verdict(report)}\n"
        f'<nav class="noprint" aria-label="sections">{nav}</nav>\n'
        f"{body}\n"
        f"{_footer(report)}\n"
        f"<script>{SCRIPT}</script>\n"
        "</body>\n</html>\n"
    )


# ---------------------------------------------------------------- small helpers


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _num(value: float | None, spec: str = ".3g") -> str:
    return _e(number(value, spec))


def _code(text: str) -> str:
    return f"<code>{_e(text)}</code>"


def _layer_ref(name: str | None, names: dict[str, int]) -> str:
    """A layer name as code, linked to its table row when the table has it."""
    if name is None:
        return '<span class="muted">(model)</span>'
    shown = _code(name or "(root)")
    return f'<a href="#L{names[name]}">{shown}</a>' if name in names else shown


def _anchors(report: Report) -> dict[str, int]:
    names: dict[str, int] = {}
    for index, layer in enumerate(report.layers):
        names.setdefault(layer.name, index)
    return names


def _sort_value(value: float | None) -> str:
    """A ``data-v`` for the sorting script: JS ``parseFloat`` reads it; empty for a missing value."""
    if value is None:
        return ""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ul(items: Iterable[str], cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<ul{attr}>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


# ---------------------------------------------------------------- verdict, run, path


def _path_sentence(report: Report) -> str:
    path = report.path
    if path.attenuation is None:
        return "the gradient could not be followed from the output to the input (too few finite measurements)"
    what = "activation gradient" if path.measured_with == "activation_gradients" else "parameter gradient ratio"
    return (
        f"{what} at the input end ({_code(path.first_layer or '?')}) ÷ output end ({_code(path.last_layer or '?')}) "
        f"= <strong>{_num(path.attenuation)}</strong> over {path.length} calls, "
        f"gain <strong>{_num(path.gain)}</strong> per layer"
    )


def _verdict(report: Report) -> str:
    counts = [
        _plural(n, _SEVERITY_WORD[severity])
        for severity in (Severity.ERROR, Severity.WARNING, Severity.INFO)
        if (n := sum(f.severity is severity for f in report.findings))
    ]
    if report.healthy:
        cls, head = "good", "✓ healthy"
        tail = f'<p class="summary">{_e(verdict(report).summary)}</p>'
    else:
        cls = "bad"
        head = "✗ unhealthy " + "".join(f'<span class="problem">{_e(p.value)}</span>' for p in report.problems)
        tail = ""
    lines = [
        f'<header class="verdict {cls}" role="banner">',
        '<p class="brand">gradcheck report</p>',
        f"<h1>{head}</h1>",
        tail,
        f"<p>{_e(report.run.model_type)} ({_e(count(report.run.parameters))} parameters) · "
        f"{_history_sentence(report) if report.history is not None else _path_sentence(report)}</p>",
    ]
    extra = []
    if counts:
        extra.append(f'<a href="#findings">{_e(", ".join(counts))}</a>')
    if report.baseline is not None:
        extra.append(
            '<a href="#baseline">against the baseline: '
            + ("<strong>regressed</strong>" if report.baseline.regressed else "no regression")
            + "</a>"
        )
    if extra:
        lines.append(f"<p>{' · '.join(extra)}</p>")
    origin = report.non_finite_origin
    if origin is not None and origin.forward_module is not None:
        whose = f", whose {', '.join(origin.non_finite_parameters)} is NaN/Inf" if origin.non_finite_parameters else ""
        lines.append(
            f'<p><a href="#causes">NaN/Inf first appears</a> in the forward pass at '
            f"{_code(origin.forward_module or '(root)')} ({_e(origin.forward_type)}){_e(whose)}</p>"
        )
    elif origin is not None and origin.backward_module is not None:
        lines.append(
            f'<p><a href="#causes">NaN/Inf first appears</a> in the backward pass, in the gradient at the output of '
            f"{_code(origin.backward_module or '(root)')} ({_e(origin.backward_type)})</p>"
        )
    if report.recommendations:
        rec = report.recommendations[0]
        state = _verification_state(_verifications(report).get(rec.id))
        badge = f' <span class="badge {state[0]}">{_e(state[1])}</span>' if state else ""
        lines.append(f'<p>first fix to try: <a href="#rec-1">{_e(rec.title)}</a>{badge}</p>')
    lines.append("</header>")
    return "\n".join(line for line in lines if line)


def _history_sentence(report: Report) -> str:
    """The banner's line for a training history: the records, then where the first problem began."""
    history = report.history
    assert history is not None
    text = f'<a href="#history">training history</a>: {_e(history_head(history))}'
    first = first_onset(history, (p.value for p in report.problems))
    if first is not None:
        text += f" · {_e(PROBLEM_WORDS.get(first.problem, first.problem))} from step <strong>{first.step}</strong>"
        if first.last_healthy_step is not None:
            text += f" (last healthy record: step {first.last_healthy_step})"
    return text


def _run(report: Report) -> str:
    run = report.run
    if report.history is not None:
        return _history_run(report, report.history)
    rows = [
        (
            "model",
            f"<strong>{_e(run.model_type)}</strong> · {_e(count(run.parameters))} parameters ({run.parameters:,})",
        ),
        ("source", f"{_code(run.source)} <span class='muted'>[{_e(run.checkpoint_kind)}]</span>"),
        ("batch", f"{_code(run.batch)} <span class='muted'>({_e(run.batch_source)})</span>"),
        ("loss", f"<strong>{_num(run.loss_value, '.4g')}</strong> — {_e(run.loss)}"),
        ("mode", f"{_e(run.mode)} · seed {run.seed}"),
        ("device", _e(run.device)),
        (
            "measured with",
            "activation gradients ‖∂L/∂h‖ (module hooks)"
            if report.path.measured_with == "activation_gradients"
            else "parameter gradients ‖∂L/∂W‖/‖W‖ (module hooks could not fire)",
        ),
    ]
    rows += _thresholds_and_versions(report)
    if report.timing:
        rows.append(("timing", " · ".join(f"{_e(k)} {v:.2g} s" for k, v in report.timing.items())))
    return '<dl class="run">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _history_run(report: Report, history: TrainingHistory) -> str:
    run = report.run
    losses = loss_range(history)
    if losses is not None:
        (first, start), (last, end) = losses
        loss = f"<strong>{_num(start, '.4g')}</strong> at step {first}"
        if last != first:
            loss += f" → <strong>{_num(end, '.4g')}</strong> at step {last}"
        loss += f" — {_e(run.loss)}"
    else:
        loss = "<span class='muted'>not recorded (pass it to <code>step(loss)</code> to record it)</span>"
    rows = [
        (
            "model",
            f"<strong>{_e(run.model_type)}</strong> · {_e(count(run.parameters))} parameters ({run.parameters:,})",
        ),
        ("source", f"{_code(run.source)} <span class='muted'>[{_e(run.checkpoint_kind)}]</span>"),
        ("records", f"{_e(history_head(history))} <span class='muted'>({_e(run.batch_source)})</span>"),
        ("loss", loss),
        ("mode", _e(run.mode)),
    ]
    if history.earlier_runs:
        rows.append(("runs in the file", f"{history.earlier_runs + 1}; this report reads the last"))
    rows += _thresholds_and_versions(report)
    return '<dl class="run">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _chart(report: Report) -> str:
    points = chart_points(report)
    flagged = sum(p.kind in ("flagged", "zero", "nonfinite", "nograd") for p in points)
    skipped = len(report.layers) - len(points)
    what = (
        "‖∂L/∂h‖, the gradient at each layer's output, divided by the output end's"
        if report.path.measured_with == "activation_gradients"
        else "‖∂L/∂W‖/‖W‖ of each layer divided by the last layer's (module hooks could not fire)"
    )
    series = through_time(report)
    caption = [
        f"{_e(what)}; input end left, output end right, log scale. {_plural(len(points), 'layer')} plotted",
        f", {flagged} flagged" if flagged else "",
        f"; {_plural(skipped, 'layer')} without a measurement left out" if skipped else "",
        ". The shaded bands lie beyond the thresholds",
        "; a vertical bar spans a layer's calls (each call is charted below)"
        if any(p.calls for p in points)
        else "; the dashed line is the fitted gain per layer"
        if report.path.gain is not None and report.path.attenuation is not None
        else "",
        ". Hover a point for its layer and value; click it to jump to its row in the table.",
    ]
    parts = [
        f"<p>{_path_sentence(report)}</p>",
        f"<figure>{layer_chart_svg(report)}<figcaption>{''.join(caption)}</figcaption></figure>",
    ]
    for layer, values, unit in series[:MAX_TIME_CHARTS]:
        finite = [v for v in values if math.isfinite(v)]
        zeros = sum(1 for v in values if v == 0)
        detail = f"{_plural(len(values), unit)}"
        if finite:
            detail += f", from {number(finite[0], '.2g')} (first) to {number(finite[-1], '.2g')} (last)"
        if zeros:
            detail += f"; {zeros} underflowed to exactly 0"
        parts.append(
            f"<h3>Through time: {_code(layer.name or '(root)')}</h3>"
            f"<figure>{time_chart_svg(layer, values, unit, report)}<figcaption>{_e(detail)}</figcaption></figure>"
        )
    if len(series) > MAX_TIME_CHARTS:
        parts.append(
            f"<p class='muted'>{len(series) - MAX_TIME_CHARTS} more layers run several times (see the JSON report)</p>"
        )
    return "\n".join(parts)


# ---------------------------------------------------------------- findings


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
    severity = _SEVERITY_WORD[finding.severity]
    evidence = ""
    if finding.evidence:
        items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_evidence_value(v))}</dd>" for k, v in finding.evidence.items())
        evidence = f'<details class="evidence"><summary>evidence</summary><dl>{items}</dl></details>'
    return (
        f'<tr class="finding {severity}"><td><strong>{_e(finding.code)}</strong></td>'
        f'<td><span class="sev {severity}">{_e(severity)}</span></td>'
        f"<td>{_e(finding.name)}</td><td>{_layer_ref(finding.layer, names)}</td>"
        f"<td>{_e(finding.message)}{evidence}</td></tr>"
    )


def _findings(report: Report, names: dict[str, int]) -> str:
    rows = "".join(_finding_row(f, names) for f in report.findings)
    return (
        '<table class="findings"><thead><tr><th>code</th><th>severity</th><th>rule</th><th>layer</th>'
        f"<th>message</th></tr></thead><tbody>{rows}</tbody></table>"
    )


# ---------------------------------------------------------------- recommendations


def _verifications(report: Report) -> dict[str, Verification]:
    return {v.id: v for v in report.verifications}


def _verification_state(verification: Verification | None) -> tuple[str, str] | None:
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
    state = _verification_state(verification)
    badge = f'<span class="badge {state[0]}">{_e(state[1])}</span>' if state else ""
    parts = [
        f'<li id="rec-{rank}" class="rec" data-id="{_e(rec.id)}">',
        f'<h3><span class="rank">{rank}.</span>{_e(rec.title)} {_code(rec.id)}{badge}</h3>',
        f"<p><strong>why:</strong> {_e(rec.why)}</p>",
    ]
    line = verification_line(rec, verification)
    if line is not None and state is not None:
        effect = ""
        if verification is not None and verification.effect and math.isfinite(verification.effect):
            effect = f" <span class='muted'>({verification.effect:+.2g} orders of magnitude towards 1)</span>"
        parts.append(f'<p class="verification {state[0]}">{_e(line.plain)}{effect}</p>')
    meta = []
    if rec.addresses:
        meta.append("addresses " + ", ".join(_e(p.value) for p in rec.addresses))
    if rec.layers:
        shown = ", ".join(_code(name or "(root)") for name in rec.layers[:8])
        more = f" and {len(rec.layers) - 8} more" if len(rec.layers) > 8 else ""
        meta.append(f"layers {shown}{more}")
    if meta:
        parts.append(f'<p class="muted">{" · ".join(meta)}</p>')
    parts.append(f'<pre><code class="language-python">{_e(rec.snippet)}</code></pre>')
    parts.append("</li>")
    return "\n".join(parts)


def _recommendations(report: Report) -> str:
    verified = _verifications(report)
    order = "ordered by the effect verified on a copy of the model" if verified else "most likely fix first"
    items = "\n".join(
        _recommendation(rank, rec, verified.get(rec.id)) for rank, rec in enumerate(report.recommendations, start=1)
    )
    return f'<p class="muted">{_e(order)}</p>\n<ol class="recs">\n{items}\n</ol>'


# ---------------------------------------------------------------- causes


def _table(headers: list[tuple[str, bool]], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    """A plain table; ``headers`` are (title, numeric); cells are already HTML."""
    head = "".join(f"<th{_NUMERIC if numeric else ''}>{_e(title)}</th>" for title, numeric in headers)
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        cells = "".join(
            f"<td{_NUMERIC if numeric else ''}>{cell}</td>" for cell, (_, numeric) in zip(row, headers, strict=True)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _init_table(report: Report) -> str:
    audit = report.init_audit
    if audit is None or audit.skipped or not audit.layers:
        return ""
    flagged = sum(1 for layer in audit.layers if layer.flag)
    rows = [
        [
            _code(layer.layer),
            _e(layer.type),
            f"{layer.fan_in}→{layer.fan_out}",
            _e(layer.activation + (" +norm" if layer.normalised else "")),
            _num(layer.std),
            _num(layer.kaiming_std),
            _num(layer.xavier_std),
            _num(layer.ratio, ".2f"),
            _e(layer.looks_like),
            f'<span class="flag">{_e(layer.flag)}</span>' if layer.flag else "",
        ]
        for layer in audit.layers
    ]
    table = _table(
        [
            ("weight", False),
            ("type", False),
            ("fan in→out", True),
            ("then", False),
            ("std", True),
            ("Kaiming std", True),
            ("Xavier std", True),
            ("×Kaiming", True),
            ("looks like", False),
            ("flag", False),
        ],
        rows,
        ["flagged" if layer.flag else "" for layer in audit.layers],
    )
    trained = ""
    if audit.trained_layers:
        trained = (
            f"<p class='muted'>look trained (not audited): {', '.join(_code(n) for n in audit.trained_layers)}</p>"
        )
    open_ = " open" if 0 < flagged <= OPEN_ROWS else ""
    summary = f"{_plural(len(audit.layers), 'weight')} audited, {flagged} flagged"
    return f"<details{open_}><summary>{_e(summary)}</summary>{table}{trained}</details>"


def _activation_table(report: Report) -> str:
    acts = report.activations
    if not acts:
        return ""
    rows = [
        [
            _code(a.layer),
            _e(a.type),
            str(a.calls),
            _e(f"{a.elements:,}"),
            _num(a.derivative_rms),
            "–" if a.saturated is None else _e(f"{a.saturated:.1%}"),
            "–" if a.dead is None else _e(f"{a.dead:.1%}"),
            f'<span class="flag">{_e(a.flag)}</span>' if a.flag else "",
        ]
        for a in acts
    ]
    table = _table(
        [
            ("activation", False),
            ("type", False),
            ("calls", True),
            ("elements", True),
            ("φ'(z) RMS", True),
            ("saturated", True),
            ("dead", True),
            ("flag", False),
        ],
        rows,
        ["flagged" if a.flag else "" for a in acts],
    )
    flagged = sum(1 for a in acts if a.flag)
    open_ = " open" if 0 < flagged <= OPEN_ROWS else ""
    summary = f"{_plural(len(acts), 'activation')}, {flagged} flagged"
    return f"<details{open_}><summary>{_e(summary)}</summary>{table}</details>"


def _precision_table(report: Report) -> str:
    precision = report.precision
    if precision is None or not precision.layers:
        return ""
    layers = sorted(precision.layers, key=lambda p: (-p.fp16_flush, -p.fp16_subnormal))
    exponent = round(math.log2(precision.recommended_scale)) if precision.recommended_scale > 0 else 0
    rows = [
        [
            _code(p.layer),
            _e(f"{p.elements:,}"),
            _e(f"{p.zero:.1%}"),
            _e(f"{p.fp16_flush:.1%}"),
            _e(f"{p.fp16_flush_scaled:.1%}"),
            _e(f"{p.fp16_subnormal:.1%}"),
            _e(f"{p.fp16_overflow:.1%}"),
            _e(f"{p.bf16_flush:.1%}"),
            _num(p.max_abs, ".2e"),
        ]
        for p in layers
    ]
    table = _table(
        [
            ("layer", False),
            ("elements", True),
            ("zero in fp32", True),
            ("fp16 → 0", True),
            (f"fp16 → 0 at 2^{exponent}", True),
            ("fp16 subnormal", True),
            ("fp16 overflow", True),
            ("bf16 → 0", True),
            ("max |g|", True),
        ],
        rows,
    )
    lost = ""
    if precision.autocast is not None and precision.lost:
        lost = _table(
            [("layer", False), (f"lost under {precision.autocast} autocast", True)],
            [[_code(name), _e(f"{share:.1%}")] for name, share in precision.lost],
        )
    return f"<details><summary>per layer, worst first</summary>{table}{lost}</details>"


_CAUSE_TABLES = {
    "init audit": _init_table,
    "activations": _activation_table,
    "half precision": _precision_table,
}


def _causes(report: Report) -> str:
    blocks = []
    lines = cause_lines(report)
    lines.sort(key=lambda line: not line.startswith("first non-finite:"))  # where NaN began matters most
    for line in lines:
        first, *rest = line.split("\n")
        label, _, text = first.partition(": ")
        if label == "init audit":  # the terminal's head line announces its short table; ours lists all
            text = re.sub(r",? first and last shown:$", "", text).rstrip(":")
        alarm = label == "first non-finite" or "flagged" in text or any("flagged" in r for r in rest)
        detail = ""
        if label in _CAUSE_TABLES:
            detail = _CAUSE_TABLES[label](report)
        more = _ul(_e(r.strip()) for r in rest) if rest else ""
        blocks.append(
            f'<div class="cause{" alarm" if alarm else ""}"><h3>{_e(label)}</h3><p>{_e(text)}</p>{more}{detail}</div>'
        )
    return "\n".join(blocks)


# ---------------------------------------------------------------- optimisation, baseline, notes


def _optimisation(trace: OptimisationTrace) -> str:
    records = trace.steps
    name = OPTIMIZER_NAMES.get(trace.optimizer, trace.optimizer)
    last = records[-1].step if records else 0
    head = (
        f"{name}, lr {trace.lr:g}, on a copy of the model, on the sample batch: {len(records)} records, steps 0…{last}"
    )
    if trace.verdict == "stable":
        verdict = f'<p class="verification fixed"><strong>✓ {_e(VERDICT_WORDS["stable"])}</strong></p>'
    else:
        where = f" from step {trace.onset_step}" if trace.onset_step is not None else ""
        if trace.verdict == "non_finite" and trace.onset_step is not None:
            where = f" at step {trace.onset_step} (the run stopped there)"
        word = VERDICT_WORDS.get(trace.verdict, trace.verdict)
        verdict = f'<p class="flag">✗ {_e(word + where)}</p>'
    reference = records[0].grad_norm if records else math.nan
    rows = [
        [
            str(r.step),
            _num(r.loss, ".4g"),
            _num(r.grad_norm, ".3e"),
            _num(r.grad_norm / reference if math.isfinite(reference) and reference > 0 else None, ".3g"),
            _num(r.attenuation, ".3g"),
            _num(r.gain, ".3g"),
        ]
        for r in records
    ]
    late = [
        "flagged" if trace.verdict != "stable" and trace.onset_step is not None and r.step >= trace.onset_step else ""
        for r in records
    ]
    table = _table(
        [("step", True), ("loss", True), ("‖∂L/∂θ‖", True), ("÷ step 0", True), ("attenuation", True), ("gain", True)],
        rows,
        late,
    )
    return (
        f"<p>{_e(head)}</p>\n{verdict}\n<figure>{steps_chart_svg(trace)}"
        "<figcaption>total gradient norm per optimiser step divided by step 0's; the run is stable while it "
        "stays within 10^-3 … 10^3 of step 0's</figcaption></figure>\n"
        f"<details><summary>every step</summary>{table}</details>"
    )


def _history(history: TrainingHistory) -> str:
    view = steps_view(history)
    shown = history_points(history)
    first = history.steps[0] if history.steps else None
    head = f"<p>{_e(history_head(history))}, from {_code(history.source)}</p>"
    items = [
        f'<span class="verification improved">⚠</span> {_e(sentence)}'
        if resolved
        else f'<span class="flag">✗</span> {_e(sentence)}'
        for resolved, sentence in onset_sentences(history)
    ]
    verdict = _ul(items, "onsets") if items else ""
    if not any(onset.resolved_step is None for onset in history.onsets):
        verdict += f'<p class="verification fixed"><strong>✓ {_e(healthy_sentence(history))}</strong></p>'
    more = [s for s in (gain_sentence(history), clip_sentence(history)) if s is not None]
    trend = "".join(f"<p>{_e(s)}</p>" for s in more)
    if first is None:
        return f"{head}\n{verdict}\n{trend}"
    reference = first.grad_norm
    rows, classes = [], []
    for index in shown:
        record = history.steps[index]
        usable = math.isfinite(reference) and reference > 0 and not math.isnan(record.grad_norm)
        mark = ""
        if view.label(record.step):
            mark = f'<span class="flag">◀ onset: {_e(", ".join(onset_problems(history, record.step)))}</span>'
        rows.append(
            [
                str(record.step),
                _num(view.loss(record), ".4g"),
                _num(record.grad_norm, ".3e"),
                _num(record.grad_norm / reference if usable else None, ".3g"),
                _num(record.attenuation, ".3g"),
                _num(record.gain, ".3g"),
                mark,
            ]
        )
        classes.append("flagged" if record.step in view.bad else "")
    table = _table(
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
    summary = f"{_plural(n, 'record')}" + (
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
        f"{head}\n{verdict}\n<figure>{history_chart_svg(history)}<figcaption>{_e(caption)}</figcaption></figure>\n"
        f"{trend}\n<details{open_}><summary>{_e(summary)}</summary>{table}</details>"
    )


def _finding_items(findings: tuple[Finding, ...], names: dict[str, int]) -> str:
    return _ul(
        f"<strong>{_e(f.code)}</strong> {_e(f.name)} "
        f'<span class="sev {_SEVERITY_WORD[f.severity]}">{_e(f.severity.value)}</span> '
        f"{_layer_ref(f.layer, names)}: {_e(f.message)}"
        for f in findings
    )


def _moves(moves: tuple[LayerMove, ...], names: dict[str, int]) -> str:
    return _table(
        [("layer", False), ("before", True), ("after", True), ("orders", True)],
        [
            [_layer_ref(m.layer, names), _num(m.before, ".2e"), _num(m.after, ".2e"), _num(m.orders, "+.2f")]
            for m in moves
        ],
    )


def _baseline(diff: BaselineDiff, names: dict[str, int]) -> str:
    tolerance = f"{diff.tolerance:g} order{'' if diff.tolerance == 1 else 's'} of magnitude"
    state = '<strong class="flag">regressed</strong>' if diff.regressed else "<strong>no regression</strong>"
    parts = [f"<p>baseline {_code(diff.baseline)}, tolerance {_e(tolerance)}: {state}</p>"]
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


def _notes(notes: tuple[str, ...]) -> str:
    return _ul((_e(note) for note in notes), "notes")


def _footer(report: Report) -> str:
    version = f"gradcheck {report.run.gradcheck_version}" if report.run.gradcheck_version else "gradcheck"
    return (
        f"<footer>{_e(version)} · one self-contained file: no scripts, styles, fonts or images are loaded from "
        "anywhere else · the JSON report (<code>--format json</code>) holds every number</footer>"
    )


# ---------------------------------------------------------------- the layer table


def block_of(name: str) -> str:
    """The block a layer is grouped under: ``transformer.h.3.attn.c_attn`` → ``transformer.h.3``;
    ``transformer.wte`` → ``transformer``; a top-level layer → ``""`` (no group)."""
    match = _BLOCK.match(name)
    if match:
        return match.group(1)
    return name.rpartition(".")[0]


def _bar(value: float | None, bad: bool) -> str:
    """A log bar from 1 (the middle) to the value, ±``BAR_DECADES`` decades."""
    if value is None or math.isnan(value):
        return ""
    if value <= 0:
        left, width = 0.0, 50.0
    elif math.isinf(value):
        left, width = 50.0, 50.0
    else:
        decades = max(-BAR_DECADES, min(BAR_DECADES, math.log10(value)))
        width = abs(decades) / BAR_DECADES * 50
        left = 50 - width if decades < 0 else 50.0
    cls = ' class="bad"' if bad else ""
    style = f"left:{left:.1f}%;width:{max(width, 0.8):.1f}%"
    return f'<span class="bar" aria-hidden="true"><i{cls} style="{style}"></i></span>'


def _layers(report: Report) -> str:
    if not report.layers:
        return "<p>no layer owns parameters</p>"
    activation = report.path.measured_with == "activation_gradients"
    multi = any(layer.calls > 1 for layer in report.layers)
    rel = relative_gradients(report)
    headers: list[tuple[str, str, str]] = [("#", "num", "n")]  # title, sort kind, cell class
    headers += [("layer", "text", ""), ("type", "text", "")]
    if multi:
        headers.append(("calls", "num", "n"))
    headers.append(("∂L/∂h ÷ out" if activation else "g/w ÷ last", "num", "n"))
    if activation:
        headers.append(("‖∂L/∂h‖", "num", "n"))
    headers += [("‖∂L/∂W‖", "num", "n"), ("‖∂L/∂W‖/‖W‖", "num", "n"), ("params", "num", "n"), ("flags", "text", "")]
    head = "".join(
        f'<th scope="col" data-sort="{kind}"'
        + (' data-natural aria-sort="ascending"' if title == "#" else "")
        + (f' class="{cls}"' if cls else "")
        + f">{_e(title)}</th>"
        for title, kind, cls in headers
    )
    order = forward_order(report)
    blocks = [block_of(report.layers[i].name) for i in order]
    grouped = any(blocks) and len(set(blocks)) > 1
    rows: list[str] = []
    for k, index in enumerate(order):
        layer = report.layers[index]
        if grouped and (k == 0 or blocks[k] != blocks[k - 1]):
            rows.append(_group_row(report, order, blocks, k, rel, len(headers)))
        rows.append(_layer_row(index, k, layer, rel.get(index), multi, activation))
    flagged = sum(1 for layer in report.layers if layer.flags)
    intro = (
        f"<p class='muted'>{_plural(len(report.layers), 'layer')} that own parameters, in forward order"
        + (", grouped by block" if grouped else "")
        + (f"; {flagged} flagged" if flagged else "")
        + ". Click a column heading to sort (the # column restores the forward order).</p>"
    )
    return (
        f'{intro}\n<table class="layers sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def _group_row(
    report: Report, order: list[int], blocks: list[str], k: int, rel: dict[int, float | None], columns: int
) -> str:
    members = []
    j = k
    while j < len(order) and blocks[j] == blocks[k]:
        members.append(order[j])
        j += 1
    values = [v for i in members if (v := rel.get(i)) is not None and math.isfinite(v) and v > 0]
    flagged = sum(1 for i in members if report.layers[i].flags)
    info = [_plural(len(members), "layer")]
    if values:
        info.append(f"∂L/∂h ÷ out {number(min(values), '.2g')} … {number(max(values), '.2g')}")
    if flagged:
        info.append(f"{flagged} flagged")
    return (
        f'<tr class="grp" data-pos="{k - 0.5}"><th colspan="{columns}" scope="rowgroup">'
        f"{_code(blocks[k]) if blocks[k] else '(top level)'} <span class='muted'>· {_e(' · '.join(info))}</span>"
        "</th></tr>"
    )


def _layer_row(index: int, k: int, layer: LayerStats, value: float | None, multi: bool, activation: bool) -> str:
    bad = bool(layer.flags)
    cls = ' class="flagged"' if bad else ""
    position = "–" if layer.position < 0 else str(layer.position)
    flags = ", ".join(layer.flags)
    if layer.frozen:
        flags = (flags + ", " if flags else "") + "frozen"
    cells = [
        f'<td class="n" data-v="{k}">{_e(position)}</td>',
        f'<td class="name">{_code(layer.name or "(root)")}</td>',
        f"<td>{_e(layer.type)}</td>",
    ]
    if multi:
        cells.append(f'<td class="n" data-v="{layer.calls}">{layer.calls}</td>')
    cells.append(f'<td class="n" data-v="{_sort_value(value)}">{_num(value, ".2e")}{_bar(value, bad)}</td>')
    if activation:
        cells.append(
            f'<td class="n" data-v="{_sort_value(layer.act_grad_norm)}">{_num(layer.act_grad_norm, ".2e")}</td>'
        )
    ratio = layer.grad_weight_ratio
    cells += [
        f'<td class="n" data-v="{_sort_value(layer.grad_norm)}">{_num(layer.grad_norm, ".2e")}</td>',
        f'<td class="n" data-v="{_sort_value(ratio)}">{_num(ratio, ".2e")}</td>',
        f'<td class="n" data-v="{layer.params}">{_e(count(layer.params))}</td>',
        f'<td class="flag">{_e(flags)}</td>' if bad else f'<td class="muted">{_e(flags)}</td>',
    ]
    return f'<tr id="L{index}" data-pos="{k}"{cls}>' + "".join(cells) + "</tr>"


def _thresholds_and_versions(report: Report) -> list[tuple[str, str]]:
    """The run rows every report ends with: the thresholds used and the versions that measured."""
    rows = []
    if report.thresholds:
        rows.append(
            (
                "thresholds",
                " · ".join(
                    f"{_e(key.replace('_', ' '))} {_num(value, 'g')}" for key, value in report.thresholds.items()
                ),
            )
        )
    run = report.run
    versions = [f"gradcheck {_e(run.gradcheck_version)}" if run.gradcheck_version else ""]
    versions.append(f"torch {_e(run.torch_version)}" if run.torch_version else "")
    if any(versions):
        rows.append(("versions", " · ".join(v for v in versions if v)))
    return rows
