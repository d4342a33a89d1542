"""The HTML report: one self-contained, valid page with inline SVG charts (drawn by matplotlib), a per-layer
table, causes, findings, recommendations with their verified effects, and everything from the model escaped."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from html.parser import HTMLParser

import pytest

import zoo
from gradcheck_cli.api import check
from gradcheck_cli.load.examples import get_example
from gradcheck_cli.render.causes_text import verification_line
from gradcheck_cli.render.charts.layer_axis import MAX_TICKS
from gradcheck_cli.render.charts.style import MAX_LABEL
from gradcheck_cli.render.html import SCRIPT, render_html, script_hash
from gradcheck_cli.render.html.figures import layer_chart_svg, steps_chart_svg
from gradcheck_cli.render.html.layers import block_of
from gradcheck_cli.report.report import BaselineDiff, Finding, LayerMove, Problem, Recommendation, Report, Severity
from gradcheck_cli.report.sections import OptimisationTrace, StepRecord

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
URL_ATTRIBUTES = {"src", "srcset", "action", "formaction", "poster", "data", "background", "xlink:href", "ping"}
LOADING_TAGS = {"link", "img", "iframe", "object", "embed", "base", "audio", "video", "source", "frame", "form"}
EVIL = "<script>alert(1)</script>"


class Page(HTMLParser):
    """Collects what the tests look at, and every nesting error (HTML5 void elements aside)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.codes: list[str] = []
        self._code: list[str] | None = None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "code" and self.stack and self.stack[-1] == "pre":
            self._code = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            self.errors.append(f"end tag for void element {tag}")
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if tag == "code" and self._code is not None:
            self.codes.append("".join(self._code))
            self._code = None

    def handle_data(self, data: str) -> None:
        where = self.stack[-1] if self.stack else ""
        if where == "script":
            self.scripts.append(data)
        elif where == "style":
            self.styles.append(data)
        else:
            self.text.append(data)
            if self._code is not None:
                self._code.append(data)

    @property
    def plain(self) -> str:
        return "".join(self.text)

    def having(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        """Elements with this tag whose attributes contain each given class word or value."""
        found = []
        for name, values in self.elements:
            if name != tag:
                continue
            if all(
                (want in (values.get("class") or "").split()) if key == "class_" else values.get(key) == want
                for key, want in attrs.items()
            ):
                found.append(values)
        return found


def svgs(html: str) -> list[ET.Element]:
    """Every inline SVG, parsed as XML (it must be well-formed)."""
    return [ET.fromstring(match) for match in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


def classed(root: ET.Element, word: str) -> list[ET.Element]:
    return [e for e in root.iter() if word in (e.get("class") or "").split()]


def layer_chart(html: str) -> ET.Element:
    (chart,) = [s for s in svgs(html) if "layers" in (s.get("class") or "").split()]
    return chart


def example(name: str) -> Report:
    model, batch = get_example(name).build(0)
    return check(model, batch, source=f"example:{name}", checkpoint_kind="example")


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    model, batch = zoo.hf_gpt2(True)
    names = ("relu-xavier", "relu-kaiming", "nan-weight", "rnn-vanishing", "fp16-underflow")
    made = {name: example(name) for name in names}
    made["gpt2"] = check(model, batch, source="hf-gpt2", checkpoint_kind="module")
    return made


@pytest.fixture(scope="module")
def pages(reports: dict[str, Report]) -> dict[str, str]:
    return {name: render_html(report) for name, report in reports.items()}


# ---------------------------------------------------------------- self-contained, valid HTML5


@pytest.mark.parametrize("name", ["relu-xavier", "relu-kaiming", "nan-weight", "rnn-vanishing", "gpt2"])
def test_page_is_valid_and_self_contained(pages: dict[str, str], name: str) -> None:
    html = pages[name]
    page = Page(html)
    assert html.startswith("<!DOCTYPE html>\n")
    assert page.errors == []
    assert [t for t, _ in page.elements].count("html") == 1
    assert page.having("meta", charset="utf-8")
    for tag, attrs in page.elements:
        assert tag not in LOADING_TAGS, tag
        assert not URL_ATTRIBUTES & set(attrs), (tag, attrs)
        assert not any(key.startswith("on") for key in attrs), (tag, attrs)  # no inline handlers
        href = attrs.get("href")
        assert href is None or href.startswith("#"), href
        if href is not None and len(href) > 1:  # every in-page link lands somewhere
            assert any(a.get("id") == href[1:] for _, a in page.elements), href
    css = "".join(page.styles)
    assert "@import" not in css and "url(" not in css
    assert "://" not in html and "data:" not in html  # not one URL: nothing to fetch, nothing to leak
    assert page.scripts == [SCRIPT]  # the one inline script, nothing else
    (csp,) = page.having("meta", **{"http-equiv": "Content-Security-Policy"})
    assert "default-src 'none'" in (csp["content"] or "")
    assert script_hash() in (csp["content"] or "")
    ids = [a["id"] for _, a in page.elements if a.get("id")]
    assert len(ids) == len(set(ids))  # anchors are unique


def test_page_reads_without_javascript(pages: dict[str, str]) -> None:
    """The table is already in forward order, grouped by block; sorting only needs the data-v values."""
    page = Page(pages["gpt2"])
    rows = [a for t, a in page.elements if t == "tr" and a.get("data-pos") is not None]
    positions = [float(a["data-pos"] or "nan") for a in rows]
    assert positions == sorted(positions)
    heads = [a for a in rows if "grp" in (a.get("class") or "").split()]
    assert heads and all(float(a["data-pos"] or "0") % 1 == 0.5 for a in heads)  # just before their first layer
    assert page.having("table", class_="sortable")
    assert all(a.get("data-sort") in ("num", "text") for a in page.having("th", scope="col"))


# ---------------------------------------------------------------- content


def test_sick_model_page(reports: dict[str, Report], pages: dict[str, str]) -> None:
    report, html = reports["relu-xavier"], pages["relu-xavier"]
    page = Page(html)
    assert page.having("header", class_="bad")
    assert "unhealthy" in page.plain and "vanishing" in page.plain
    for finding in report.findings:
        assert finding.code in page.plain
        assert finding.message in page.plain
    assert [a["data-id"] for a in page.having("li", class_="rec")] == [r.id for r in report.recommendations]
    for rec in report.recommendations:
        assert rec.snippet in page.codes  # verbatim inside <pre><code>
        assert rec.why in page.plain
    verified = {v.id: v for v in report.verifications}
    assert verified
    for rec in report.recommendations:
        line = verification_line(rec, verified.get(rec.id))
        assert line is not None and line.plain in page.plain
    assert "fixed on a copy" in page.plain
    for run_value in (report.run.model_type, report.run.batch, report.run.loss, report.run.device):
        assert run_value in page.plain
    assert report.run.torch_version in page.plain
    assert "init audit" in page.plain and "activations" in page.plain
    assert report.precision is None and "half precision" not in page.plain  # a float32 model: no forecast asked for


def test_half_precision_model_page_has_the_forecast(reports: dict[str, Report], pages: dict[str, str]) -> None:
    report, page = reports["fp16-underflow"], Page(pages["fp16-underflow"])
    assert report.precision is not None and report.precision.layers
    assert "half precision" in page.plain
    assert any(f.code == "GC013" and f.severity.value == "warning" for f in report.findings)


def test_table_has_one_row_per_layer(reports: dict[str, Report], pages: dict[str, str]) -> None:
    for name in ("relu-xavier", "gpt2", "nan-weight"):
        page = Page(pages[name])
        rows = [a for t, a in page.elements if t == "tr" and re.fullmatch(r"L\d+", a.get("id") or "")]
        assert len(rows) == len(reports[name].layers)
        flagged = [a for a in rows if "flagged" in (a.get("class") or "").split()]
        assert len(flagged) == sum(1 for layer in reports[name].layers if layer.flags)


def test_chart_has_one_point_per_measured_layer(reports: dict[str, Report], pages: dict[str, str]) -> None:
    for name in ("relu-xavier", "relu-kaiming", "gpt2", "nan-weight"):
        report, chart = reports[name], layer_chart(pages[name])
        points = classed(chart, "pt")
        assert len(points) == len(report.layers)  # every layer of these models got a gradient
        for point in points:
            title = point.find("title")
            assert title is not None and title.text
            index = int((point.get("href") or "#L-1")[2:])
            assert (report.layers[index].name or "(root)") in title.text
    xavier = layer_chart(pages["relu-xavier"])
    assert len(classed(xavier, "flagged")) == sum(1 for layer in reports["relu-xavier"].layers if layer.flags) > 0
    assert classed(xavier, "fit")  # the fitted gain line
    assert classed(xavier, "band")  # the thresholds
    assert not classed(layer_chart(pages["relu-kaiming"]), "flagged")
    nan = layer_chart(pages["nan-weight"])
    assert len(classed(nan, "nonfinite")) == len(reports["nan-weight"].layers)


def test_chart_points_run_from_input_to_output(pages: dict[str, str]) -> None:
    chart = layer_chart(pages["gpt2"])
    xs = [float(next(iter(p.iter("use"))).get("x") or "nan") for p in classed(chart, "pt")]
    assert xs == sorted(xs)
    titles = ["".join(p.find("title").itertext()) for p in classed(chart, "pt")]  # type: ignore[union-attr]
    assert "transformer.wte" in titles[0] and "lm_head" in titles[-1]


def ticks(chart: ET.Element) -> list[str]:
    """The layer names under the chart's axis, left to right."""
    named = [e for e in chart.iter() if (e.get("id") or "").startswith("layers-layer-tick-")]
    return ["".join(e.itertext()) for e in named]


def test_chart_thins_labels_for_deep_models(reports: dict[str, Report], pages: dict[str, str]) -> None:
    texts = ticks(layer_chart(pages["relu-xavier"]))
    assert 2 <= len(texts) <= MAX_TICKS < len(reports["relu-xavier"].layers)
    assert texts[0] == "0" and texts[-1] == "98"  # first and last always labelled
    report = reports["relu-xavier"]
    deep = replace(
        report,
        layers=tuple(
            replace(report.layers[i % 50], name=f"encoder.blocks.{i}.mlp.fc{i % 2}", position=i) for i in range(500)
        ),
    )
    chart = ET.fromstring(layer_chart_svg(deep))
    assert len(classed(chart, "pt")) == 500
    assert 2 <= len(ticks(chart)) <= MAX_TICKS
    assert all(len(label) <= MAX_LABEL for label in ticks(chart))  # long names are shortened


def test_healthy_page(pages: dict[str, str]) -> None:
    page = Page(pages["relu-kaiming"])
    assert page.having("header", class_="good")
    assert "✓ healthy" in page.plain
    assert not page.having("section", id="findings")


def test_non_finite_page(pages: dict[str, str], reports: dict[str, Report]) -> None:
    page = Page(pages["nan-weight"])
    origin = reports["nan-weight"].non_finite_origin
    assert origin is not None and origin.forward_module == "2"
    assert "NaN/Inf first appears in the forward pass at 2 (Linear)" in page.plain
    causes = pages["nan-weight"].split('<section id="causes">')[1]
    assert causes.index("first non-finite") < causes.index("init audit")  # the origin comes first
    assert "not verified" in page.plain  # lower_lr cannot be verified on one batch


def test_gpt2_groups_layers_by_block(pages: dict[str, str]) -> None:
    page = Page(pages["gpt2"])
    assert len(page.having("tr", class_="grp")) >= 5
    html = pages["gpt2"].split('<section id="layers">')[1]
    for block in ("transformer.h.0", "transformer.h.3", "(top level)"):
        assert block in page.plain
    assert html.index("<code>transformer.h.3</code>") < html.index("<code>transformer.h.3.ln_1</code>")
    assert block_of("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert block_of("transformer.wte") == "transformer"
    assert block_of("lm_head") == ""
    assert block_of("layer1.0.conv1") == "layer1.0"
    assert block_of("features.3") == "features"


def test_recurrent_cell_gets_a_through_time_chart(pages: dict[str, str]) -> None:
    charts = [s for s in svgs(pages["rnn-vanishing"]) if "time" in (s.get("class") or "").split()]
    assert len(charts) == 1
    assert len(classed(charts[0], "call")) == 200
    assert "underflowed to exactly 0" in Page(pages["rnn-vanishing"]).plain


# ---------------------------------------------------------------- escaping


def test_everything_from_the_model_is_escaped(reports: dict[str, Report]) -> None:
    report = reports["relu-xavier"]
    layers = (replace(report.layers[0], name=EVIL, type=EVIL), *report.layers[1:])
    finding = replace(report.findings[0], layer=EVIL, message=f"{EVIL} & <b>bold</b> \"quoted\" 'single'")
    rec = Recommendation("kaiming_init", EVIL, EVIL, f"x = '</code></pre>{EVIL}'", (Problem.VANISHING,), (EVIL,))
    evil = replace(
        report,
        layers=layers,
        findings=(finding, *report.findings[1:]),
        recommendations=(rec,),
        run=replace(report.run, model_type=EVIL, source=EVIL, batch=EVIL),
        notes=(EVIL,),
        path=replace(report.path, first_layer=EVIL),
    )
    html = render_html(evil)
    page = Page(html)
    assert page.errors == []
    assert page.scripts == [SCRIPT]  # no injected script element
    assert "alert(1)</script>" not in html.replace(SCRIPT, "")
    assert not any(t in ("b",) for t, _ in page.elements)  # markup in messages stays text
    assert finding.message in page.plain
    assert rec.snippet in page.codes
    assert page.plain.count(EVIL) >= 8
    chart = layer_chart(html)  # still well-formed XML, the name in a tooltip
    titles = ["".join(e.itertext()) for e in chart.iter("title")]
    assert any(EVIL in t for t in titles)


# ---------------------------------------------------------------- optional sections


def test_optimisation_baseline_and_notes(reports: dict[str, Report]) -> None:
    report = reports["relu-xavier"]
    trace = OptimisationTrace(
        optimizer="sgd",
        lr=0.5,
        layers=("0", "98"),
        steps=(
            StepRecord(0, 2.3, 1.0, 1e-7, 0.7, (1.0, 1.0)),
            StepRecord(1, 2.1, 30.0, 1e-6, 0.8, (1.0, 1.0)),
            StepRecord(2, 9.0, 4e4, 1e-5, 0.9, (1.0, 1.0)),
            StepRecord(3, math.nan, math.inf, None, None, (math.nan, math.nan)),
        ),
        verdict="exploding",
        onset_step=2,
    )
    new = Finding("GC002", "exploding-gradient", Severity.ERROR, Problem.EXPLODING, "4", "grew")
    fixed = Finding("GC010", "init-scale", Severity.WARNING, None, "0", "was too small")
    diff = BaselineDiff(
        "base.json", 1.0, (new,), (fixed,), (LayerMove("4", 1e-3, 1e-6),), (LayerMove("96", 1e-2, 0.5),)
    )
    html = render_html(replace(report, optimisation=trace, baseline=diff, notes=("first note", "second note")))
    page = Page(html)
    assert page.errors == []
    for section in ("optimisation", "baseline", "notes"):
        assert page.having("section", id=section)
    (steps,) = [s for s in svgs(html) if "steps" in (s.get("class") or "").split()]
    assert len(classed(steps, "step")) == 4
    assert classed(steps, "onset")
    assert "exploding from step 2" in page.plain
    assert "regressed" in page.plain and "base.json" in page.plain
    assert "GC002" in page.plain and "was too small" in page.plain
    assert "-3.00" in page.plain  # orders of magnitude of the worse layer
    assert "first note" in page.plain and "second note" in page.plain
    assert ET.fromstring(steps_chart_svg(replace(trace, steps=())))  # nothing to plot is still an SVG


def test_parameter_gradient_fallback(reports: dict[str, Report]) -> None:
    """TorchScript/export models: no activation gradients; the chart and table use ‖∂L/∂W‖/‖W‖."""
    report = reports["relu-xavier"]
    layers = tuple(replace(layer, act_grad_norm=None, act_grad_norms=(), act_grad_rel=None) for layer in report.layers)
    fallback = replace(report, layers=layers, path=replace(report.path, measured_with="parameter_gradients"))
    html = render_html(fallback)
    page = Page(html)
    assert page.errors == []
    assert "g/w ÷ last" in page.plain and "‖∂L/∂h‖" not in [t.strip() for t in page.text]
    assert len(classed(layer_chart(html), "pt")) == len(layers)


def test_nothing_measured(reports: dict[str, Report]) -> None:
    report = reports["relu-kaiming"]
    empty = replace(report, layers=(), path=replace(report.path, length=0, attenuation=None, gain=None))
    html = render_html(empty)
    page = Page(html)
    assert page.errors == []
    assert "no layer ran: nothing to draw" in page.plain
    assert not classed(layer_chart(html), "pt")


def _masked(report: Report) -> Report:
    """Without what differs between two runs of one check (how long each verification took, --profile timing),
    as tests/test_formats.py masks it."""
    return replace(report, verifications=tuple(replace(v, seconds=0.0) for v in report.verifications), timing={})


def test_output_is_deterministic_text(reports: dict[str, Report]) -> None:
    html = render_html(_masked(reports["relu-xavier"]))
    # a fresh check of the same example (not the same Report object) renders the same page
    fresh = example("relu-xavier")
    assert fresh is not reports["relu-xavier"] and fresh.verifications
    assert render_html(_masked(fresh)) == html
    assert html.endswith("</html>\n")
    assert "\r" not in html
