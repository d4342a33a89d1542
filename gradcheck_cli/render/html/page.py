"""The HTML report: one self-contained page for CI artifacts (``--format html --output report.html``).

Everything is inline: the CSS, the charts (SVG drawn by :mod:`gradcheck_cli.render.charts`) and a small
script that makes the layer table sortable. Nothing is fetched (a Content-Security-Policy meta tag
forbids it, and allows only that one script by its hash); the page reads the same without JS
(the table then stays in forward order, grouped by block) and prints. Every string that comes from
the model or the report is escaped. The sections live in the modules beside this one.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape
from importlib import resources

from gradcheck_cli.render.html.causes import causes_section
from gradcheck_cli.render.html.findings import (
    baseline_section,
    findings_table,
    recommendation_list,
    verification_state,
    verifications,
)
from gradcheck_cli.render.html.layers import layer_table
from gradcheck_cli.render.html.markup import SEVERITY_WORD, anchors, code, e, num, plural, ul
from gradcheck_cli.render.html.path import path_section, path_sentence
from gradcheck_cli.render.html.steps import history_section, optimisation_section
from gradcheck_cli.render.numbers import count
from gradcheck_cli.render.view import (
    PROBLEM_WORDS,
    first_onset,
    focus,
    history_head,
    loss_range,
    status_line,
    verdict,
)
from gradcheck_cli.report.report import NOT_MEASURED, Report, Severity
from gradcheck_cli.report.sections import TrainingHistory


def _asset(name: str) -> str:
    """A file of ``gradcheck_cli/render/assets`` as text (shipped as package data)."""
    return (resources.files("gradcheck_cli.render") / "assets" / name).read_text(encoding="utf-8")


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
    names = anchors(report)
    where = focus(report.history) if report.history is not None else None
    at = f" at step {where[0]} ({where[1]})" if where is not None else ""
    sections = [
        ("run", "Run", _run(report)),
        ("notes", "Notes", _notes(report.notes) if report.notes else ""),
        ("history", "Training history", history_section(report.history) if report.history is not None else ""),
        ("chart", f"Gradient along the path{at}", path_section(report)),
        ("findings", "Findings", findings_table(report, names) if report.findings else ""),
        ("recommendations", "Recommendations", recommendation_list(report) if report.recommendations else ""),
        ("causes", "Causes", causes_section(report)),
        (
            "optimisation",
            "Optimisation probe",
            optimisation_section(report.optimisation) if report.optimisation else "",
        ),
        ("baseline", "Against the baseline", baseline_section(report.baseline, names) if report.baseline else ""),
        ("layers", f"Layers{at}", layer_table(report)),
    ]
    present = [(anchor, title, body) for anchor, title, body in sections if body]
    nav = " ".join(f'<a href="#{anchor}">{escape(title)}</a>' for anchor, title, _ in present)
    body = "\n".join(
        f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n{content}\n</section>'
        for anchor, title, content in present
    )
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src {script_hash()}"
    status = status_line(report)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(csp)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="gradcheck">\n'
        f"<title>{escape(f'gradcheck: {status} — {report.run.model_type}')}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n"
        f"{verdict_banner(report)}\n"
        f'<nav class="noprint" aria-label="sections">{nav}</nav>\n'
        f"{body}\n"
        f"{_footer(report)}\n"
        f"<script>{SCRIPT}</script>\n"
        "</body>\n</html>\n"
    )


def verdict_banner(report: Report) -> str:
    """The page's banner: the verdict, the model and its path (or history), the counts, the first fix."""
    counts = [
        plural(n, SEVERITY_WORD[severity])
        for severity in (Severity.ERROR, Severity.WARNING, Severity.INFO)
        if (n := sum(f.severity is severity for f in report.findings))
    ]
    if report.healthy:
        cls, head = "good", "✓ healthy"
        tail = f'<p class="summary">{e(verdict(report).summary)}</p>'
    elif report.status == NOT_MEASURED:
        cls, head = "unmeasured", "? not measured"
        tail = f'<p class="summary">{e(verdict(report).summary)}</p>'
    else:
        cls = "bad"
        head = "✗ unhealthy " + "".join(f'<span class="problem">{e(p.value)}</span>' for p in report.problems)
        tail = ""
    lines = [
        f'<header class="verdict {cls}" role="banner">',
        '<p class="brand">gradcheck report</p>',
        f"<h1>{head}</h1>",
        tail,
        f"<p>{e(report.run.model_type)} ({e(count(report.run.parameters))} parameters) · "
        f"{_history_sentence(report) if report.history is not None else path_sentence(report)}</p>",
    ]
    extra = []
    if counts:
        extra.append(f'<a href="#findings">{e(", ".join(counts))}</a>')
    against = verdict(report).against_baseline
    if against is not None:
        regressed = report.baseline is not None and report.baseline.regressed
        words = f'<strong class="flag">{e(against)}</strong>' if regressed else e(against)
        extra.append(f'<a href="#baseline">{words}</a>')
    if extra:
        lines.append(f"<p>{' · '.join(extra)}</p>")
    origin = report.non_finite_origin
    if origin is not None and origin.forward_module is not None:
        whose = f", whose {', '.join(origin.non_finite_parameters)} is NaN/Inf" if origin.non_finite_parameters else ""
        lines.append(
            f'<p><a href="#causes">NaN/Inf first appears</a> in the forward pass at '
            f"{code(origin.forward_module or '(root)')} ({e(origin.forward_type)}){e(whose)}</p>"
        )
    elif origin is not None and origin.backward_module is not None:
        lines.append(
            f'<p><a href="#causes">NaN/Inf first appears</a> in the backward pass, in the gradient at the output of '
            f"{code(origin.backward_module or '(root)')} ({e(origin.backward_type)})</p>"
        )
    if report.recommendations:
        rec = report.recommendations[0]
        state = verification_state(verifications(report).get(rec.id))
        badge = f' <span class="badge {state[0]}">{e(state[1])}</span>' if state else ""
        lines.append(f'<p>first fix to try: <a href="#rec-1">{e(rec.title)}</a>{badge}</p>')
    lines.append("</header>")
    return "\n".join(line for line in lines if line)


def _history_sentence(report: Report) -> str:
    """The banner's line for a training history: the records, then where the first problem began."""
    history = report.history
    assert history is not None
    text = f'<a href="#history">training history</a>: {e(history_head(history))}'
    first = first_onset(history, (p.value for p in report.problems))
    if first is not None:
        text += f" · {e(PROBLEM_WORDS.get(first.problem, first.problem))} from step <strong>{first.step}</strong>"
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
            f"<strong>{e(run.model_type)}</strong> · {e(count(run.parameters))} parameters ({run.parameters:,})",
        ),
        ("source", f"{code(run.source)} <span class='muted'>[{e(run.checkpoint_kind)}]</span>"),
        ("batch", f"{code(run.batch)} <span class='muted'>({e(run.batch_source)})</span>"),
        ("loss", f"<strong>{num(run.loss_value, '.4g')}</strong> — {e(run.loss)}"),
        ("mode", f"{e(run.mode)} · seed {run.seed}"),
        ("device", e(run.device)),
        (
            "measured with",
            "activation gradients ‖∂L/∂h‖ (module hooks)"
            if report.path.measured_with == "activation_gradients"
            else "parameter gradients ‖∂L/∂W‖/‖W‖ (module hooks could not fire)",
        ),
    ]
    rows += thresholds_and_versions(report)
    if report.timing:
        rows.append(("timing", " · ".join(f"{e(k)} {v:.2g} s" for k, v in report.timing.items())))
    return '<dl class="run">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _history_run(report: Report, history: TrainingHistory) -> str:
    run = report.run
    losses = loss_range(history)
    if losses is not None:
        (first, start), (last, end) = losses
        loss = f"<strong>{num(start, '.4g')}</strong> at step {first}"
        if last != first:
            loss += f" → <strong>{num(end, '.4g')}</strong> at step {last}"
        loss += f" — {e(run.loss)}"
    else:
        loss = "<span class='muted'>not recorded (pass it to <code>step(loss)</code> to record it)</span>"
    rows = [
        (
            "model",
            f"<strong>{e(run.model_type)}</strong> · {e(count(run.parameters))} parameters ({run.parameters:,})",
        ),
        ("source", f"{code(run.source)} <span class='muted'>[{e(run.checkpoint_kind)}]</span>"),
        ("records", f"{e(history_head(history))} <span class='muted'>({e(run.batch_source)})</span>"),
        ("loss", loss),
        ("mode", e(run.mode)),
    ]
    if history.earlier_runs:
        rows.append(("runs in the file", f"{history.earlier_runs + 1}; this report reads the last"))
    rows += thresholds_and_versions(report)
    return '<dl class="run">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def thresholds_and_versions(report: Report) -> list[tuple[str, str]]:
    """The run rows every report ends with: the thresholds used and the versions that measured."""
    rows = []
    if report.thresholds:
        rows.append(
            (
                "thresholds",
                " · ".join(f"{e(key.replace('_', ' '))} {num(value, 'g')}" for key, value in report.thresholds.items()),
            )
        )
    run = report.run
    versions = [f"gradcheck {e(run.gradcheck_version)}" if run.gradcheck_version else ""]
    versions.append(f"torch {e(run.torch_version)}" if run.torch_version else "")
    if any(versions):
        rows.append(("versions", " · ".join(v for v in versions if v)))
    return rows


def _notes(notes: tuple[str, ...]) -> str:
    return ul((e(note) for note in notes), "notes")


def _footer(report: Report) -> str:
    version = f"gradcheck {report.run.gradcheck_version}" if report.run.gradcheck_version else "gradcheck"
    return (
        f"<footer>{e(version)} · one self-contained file: no scripts, styles, fonts or images are loaded from "
        "anywhere else · the JSON report (<code>--format json</code>) holds every number</footer>"
    )
