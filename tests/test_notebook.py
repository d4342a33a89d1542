"""Issue 19: the report ``check()`` returns shows itself: ``print(report)`` prints the text report and Jupyter
gets an HTML fragment with the chart and the findings (``_repr_html_``)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from gradcheck_cli import check
from gradcheck_cli.render.text import render_text
from gradcheck_cli.report.report import Report


@pytest.fixture(scope="module")
def sick() -> Report:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(30):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    return check(model, (torch.randn(32, 16), torch.randint(0, 4, (32,))), verify=False)


def test_print_shows_the_text_report(sick: Report, capsys: pytest.CaptureFixture[str]) -> None:
    assert str(sick) == render_text(sick)
    assert "\x1b[" not in str(sick) and "✗ unhealthy: vanishing" in str(sick)
    print(sick)
    assert capsys.readouterr().out == render_text(sick) + "\n"


def test_jupyter_shows_a_self_contained_fragment_with_the_chart_and_findings(sick: Report) -> None:
    html = sick._repr_html_()
    assert html is not None
    assert sick.findings and all(f.code in html for f in sick.findings)
    assert all(rec.title.split(" (")[0] in html for rec in sick.recommendations)
    assert "<svg" in html and "✗ unhealthy" in html
    assert not re.search(r"<(html|head|body|script)\b", html)  # a fragment: no page, no script
    assert not re.search(r"""(src|href)=["']https?:""", html)  # nothing fetched
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    assert style is not None
    rules = re.sub(r"@media[^{]*\{", "", style.group(1))  # the media queries' own braces
    selectors = [s.strip() for block in re.findall(r"([^{}]+)\{", rules) for s in block.split(",")]
    assert len(selectors) > 50
    assert [s for s in selectors if not s.startswith(".gradcheck-report")] == []  # the notebook keeps its looks


def test_a_healthy_report_shows_itself_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    report = check(model, torch.randn(16, 8), verify=False)
    assert "✓ healthy" in str(report)
    html = report._repr_html_()
    assert html is not None and "✓ healthy" in html and "<svg" in html
