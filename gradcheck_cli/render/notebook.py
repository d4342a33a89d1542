"""The report in a notebook: ``print(report)`` prints the text report, Jupyter shows an HTML fragment.

:func:`install_display` registers both with :mod:`gradcheck_cli.report.display` (the report stage cannot
import a renderer itself); ``gradcheck_cli/__init__.py`` calls it. The fragment holds what the HTML page
opens with (the verdict, the gradient along the path, the findings, the recommendations, the baseline),
styled by the page's own style sheet scoped to the fragment, so the notebook around it keeps its looks. It is
self-contained: inline CSS and SVG, no script, nothing fetched. The renderers are imported on first display.
"""

from __future__ import annotations

import re
from typing import Any

from gradcheck_cli.report.display import set_renderers

SCOPE = "gradcheck-report"
"""The class of the fragment's outer ``<div>``; every rule of the style sheet is confined to it."""
_RULE = re.compile(r"(\s*)([^{}@\s][^{}@]*)\{([^{}]*)\}")


def install_display() -> None:
    """Make ``str(report)`` the text report and ``report._repr_html_()`` the notebook fragment."""
    set_renderers(text=report_text, html=notebook_html)


def report_text(report: Any) -> str:
    """The text report as ``--output FILE`` holds it (no colour; control characters escaped)."""
    from gradcheck_cli.render.printable import printable
    from gradcheck_cli.render.text import render_text

    return render_text(printable(report))


def notebook_html(report: Any) -> str:
    """One ``<div>`` with a scoped ``<style>``: the verdict banner, the chart, findings and recommendations."""
    from gradcheck_cli.render.html.findings import baseline_section, findings_table, recommendation_list
    from gradcheck_cli.render.html.markup import anchors
    from gradcheck_cli.render.html.page import CSS, verdict_banner
    from gradcheck_cli.render.html.path import path_section
    from gradcheck_cli.render.html.steps import history_section
    from gradcheck_cli.render.printable import printable

    report = printable(report)
    names = anchors(report)
    sections = [
        ("Training history", history_section(report.history) if report.history is not None else ""),
        ("Gradient along the path", path_section(report)),
        ("Findings", findings_table(report, names) if report.findings else ""),
        ("Recommendations", recommendation_list(report) if report.recommendations else ""),
        ("Against the baseline", baseline_section(report.baseline, names) if report.baseline else ""),
    ]
    body = "\n".join(f"<section>\n<h2>{title}</h2>\n{content}\n</section>" for title, content in sections if content)
    return (
        f'<div class="{SCOPE}">\n<style>{scoped_css(CSS)}</style>\n{verdict_banner(report)}\n{body}\n'
        '<p class="muted">the whole report: <code>report.to_dict()</code>, or <code>gradcheck inspect '
        "--format html</code></p>\n</div>\n"
    )


def scoped_css(css: str, scope: str = SCOPE) -> str:
    """``css`` with every selector confined to ``.scope``: ``:root``, ``html`` and ``body`` become the scope
    itself, any other selector a descendant of it (inside ``@media`` blocks too)."""
    return _RULE.sub(lambda m: f"{m.group(1)}{_scoped(m.group(2), scope)} {{{m.group(3)}}}", css)


def _scoped(selectors: str, scope: str) -> str:
    out = []
    for selector in (s.strip() for s in selectors.split(",")):
        if selector in (":root", "html", "body"):
            out.append(f".{scope}")
        else:
            out.append(f".{scope} {selector}")
    return ", ".join(out)
