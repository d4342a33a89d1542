"""The report formats and the renderer of each: one table, each renderer imported only when used."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradcheck_cli.report.report import Report


class ReportFormat(str, Enum):
    """Report formats of ``inspect`` and ``history``: the terminal, JSON, and what CI systems read."""

    text = "text"
    json = "json"
    junit = "junit"
    sarif = "sarif"
    github = "github"
    markdown = "markdown"
    html = "html"


RENDERERS: dict[ReportFormat, str] = {
    ReportFormat.text: "gradcheck_cli.render.text:render_text",
    ReportFormat.json: "gradcheck_cli.render.json:render_json",
    ReportFormat.junit: "gradcheck_cli.render.junit:render_junit",
    ReportFormat.sarif: "gradcheck_cli.render.sarif:render_sarif",
    ReportFormat.github: "gradcheck_cli.render.github:render_github",
    ReportFormat.markdown: "gradcheck_cli.render.markdown:render_markdown",
    ReportFormat.html: "gradcheck_cli.render.html:render_html",
}
"""Each format's ``module:function`` taking the frozen report and returning the text (never printing)."""


def renderer(kind: ReportFormat) -> Callable[[Report], str]:
    """The function that renders ``kind``, its module imported now (start-up stays light)."""
    module, _, name = RENDERERS[kind].partition(":")
    function: Callable[[Report], str] = getattr(importlib.import_module(module), name)
    return function
