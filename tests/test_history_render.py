"""``gradcheck history`` rendered: real training runs recorded by ``watch``, judged, and drawn as text,
Markdown, HTML (inline SVG), JSON (against the published schema) and ``--plot`` pictures, through the
real command line and through the renderers."""

from __future__ import annotations

import json
import re
import struct
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_support import Proc, run_many, show
from gradcheck_cli import watch
from gradcheck_cli.render import plot
from gradcheck_cli.render.charts.engine import DPI
from gradcheck_cli.render.charts.inspect_figure import report_figure_size
from gradcheck_cli.render.html import SCRIPT, render_html, script_hash
from gradcheck_cli.render.html.figures import MAX_HISTORY_POINTS, history_points
from gradcheck_cli.render.json import render_json
from gradcheck_cli.render.markdown import render_markdown
from gradcheck_cli.render.steps_chart import render_steps_chart
from gradcheck_cli.render.text import render_text
from gradcheck_cli.render.view import MAX_ROWS, recorded_step, shown_rows, steps_view
from gradcheck_cli.report.report import Report
from gradcheck_cli.report.sections import Onset, TrainingHistory
from gradcheck_cli.training.history import history_report, judge
from gradcheck_cli.training.log import Header, History
from gradcheck_cli.training.monitor import GradientWarning
from test_html import LOADING_TAGS, URL_ATTRIBUTES, Page, classed, svgs

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "report.schema.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW = re.compile(r"^\s*(\d+)\s")


# ---------------------------------------------------------------- real training runs


def _model(depth: int = 6, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _train(
    log: Path,
    *,
    steps: int,
    every: int,
    lr: float = 0.05,
    jump_at: int | None = None,
    jump_lr: float = 5.0,
    give_loss: bool = True,
    start: int = 0,
    depth: int = 6,
) -> None:
    """SGD on a small tanh regressor with ``w.step(loss)`` between backward and the optimiser step; from
    ``jump_at`` on the learning rate is ``jump_lr`` (the run blows up)."""
    model = _model(depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    y = x[:, :1].sin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        with watch(model, every=every, log=log, start=start) as w:
            for step in range(steps):
                if step == jump_at:
                    for group in optimizer.param_groups:
                        group["lr"] = jump_lr
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                w.step(loss if give_loss else None)
                optimizer.step()
                optimizer.zero_grad()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("history")
    made = {
        "sick": root / "sick.jsonl",  # every 5 steps, the learning rate jumps 100× at step 20
        "healthy": root / "healthy.jsonl",  # 200 steps at a constant learning rate, every 10
        "long": root / "long.jsonl",  # every step: 60 records, more than the chart's rows
        "no_loss": root / "no_loss.jsonl",  # step() without the loss
        "resumed": root / "resumed.jsonl",  # watch(start=100): the first record is step 100
        "empty": root / "empty.jsonl",  # the watch block ended before the first step
    }
    _train(made["sick"], steps=40, every=5, jump_at=20)
    _train(made["healthy"], steps=200, every=10)
    _train(made["long"], steps=60, every=1, jump_at=41, depth=3)
    _train(made["no_loss"], steps=20, every=5, give_loss=False)
    _train(made["resumed"], steps=30, every=10, start=100)
    _train(made["empty"], steps=0, every=5)
    return made


@pytest.fixture(scope="module")
def reports(logs: dict[str, Path]) -> dict[str, Report]:
    made = {name: history_report(path) for name, path in logs.items() if name != "empty"}
    # a log with a header and no record is refused on reading (exit 2); judged anyway, it must still render
    made["empty"] = judge(History(Header("Sequential", 6369, 5, True, False), (), source=str(logs["empty"])))
    return made


def _history(report: Report) -> TrainingHistory:
    assert report.history is not None
    return report.history


def _onset_records(history: TrainingHistory) -> list[int]:
    """The recorded steps the renderers must mark, worked out here rather than by the renderers' helpers: for
    each onset the first record at or after its step (a NaN loss between two records shows in the next), once."""
    recorded = [r.step for r in history.steps]
    return sorted({min(step for step in recorded if step >= onset.step) for onset in history.onsets})


MARKED_AT_LEAST = {"sick": 2, "long": 2, "healthy": 0}
"""sick: exploding and vanishing at one record, NaN loss at a later one; healthy: no onset at all."""


def _expected_marks(name: str, history: TrainingHistory) -> list[int]:
    marks = _onset_records(history)
    if name == "healthy":
        assert marks == [] and history.onsets == ()
    assert len(marks) >= MARKED_AT_LEAST[name], (name, marks)
    return marks


def _flat(text: str) -> str:
    """Whitespace folded: sentences the terminal wrapped read whole again."""
    return " ".join(text.split())


def _rows(text: str) -> list[str]:
    """The chart's table rows (the lines that start with a step number), up to the first sentence."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("step"))
    rows = []
    for line in lines[start + 1 :]:
        if not ROW.match(line):
            break
        rows.append(line)
    return rows


def _validator() -> Callable[[object], list[str]]:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    return lambda doc: [e.message for e in validator.iter_errors(doc)]


def test_the_runs_are_what_the_tests_need(reports: dict[str, Report]) -> None:
    sick = _history(reports["sick"])
    assert not reports["sick"].healthy and sick.records == 8 and sick.every == 5
    assert [r.step for r in sick.steps] == list(range(0, 40, 5))
    exploding = next(o for o in sick.onsets if o.problem == "exploding")
    assert exploding.step > 20 and exploding.last_healthy_step == 20  # after the learning rate jumped
    assert reports["healthy"].healthy and _history(reports["healthy"]).records == 20
    long = _history(reports["long"])
    assert long.records == 60 > MAX_ROWS and long.onsets and long.onsets[0].step > 41
    assert [r.step for r in _history(reports["resumed"]).steps] == [100, 110, 120]
    assert _history(reports["empty"]).records == 0


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli(logs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Proc]]:
    out = tmp_path_factory.mktemp("cli")
    formats = (("json", "sick.json"), ("markdown", "sick.md"), ("html", "sick.html"))
    files = [arg for fmt, name in formats for arg in ("--format", fmt, "-o", out / name)]
    commands = {
        "sick_text": ["history", logs["sick"]],
        "healthy_text": ["history", logs["healthy"]],
        "sick_files": ["history", logs["sick"], *files, "--plot", out / "sick.png"],
        "healthy_plot": ["history", logs["healthy"], "--plot", out / "healthy.svg", "--format", "json"],
    }
    return out, dict(run_many(commands, cwd=out))


def test_cli_text_of_a_sick_run_shows_the_training_header_and_the_onset(
    cli: tuple[Path, dict[str, Proc]], reports: dict[str, Report], logs: dict[str, Path]
) -> None:
    proc = cli[1]["sick_text"]
    assert proc.returncode == 1, show(proc)
    text = _flat(proc.stdout)
    history = _history(reports["sick"])
    source = str(logs["sick"])
    assert f"gradcheck training history of Sequential (6.37k parameters) from {source}: 8 records every 5 steps" in text
    assert "seed 0" not in text and "device ;" not in text and "device" not in text.split("findings")[0]
    assert f"training history: 8 records, steps 0…35, every 5 (from {source})" in text
    exploding = next(o for o in history.onsets if o.problem == "exploding")
    assert f"exploding from step {exploding.step} (last healthy record: step 20) — GC016" in text
    first = history.problem_steps[0][0]
    assert f"gradient per layer at step {first} (first problem), input end first" in text
    assert "decades per 1000 steps over the 5 healthy records before the first problem" in text
    assert f"clip_grad_norm_ max_norm {history.clip_max_norm:g}" in text
    assert text.endswith(f"(from step {min(o.step for o in history.onsets)})")


def test_cli_healthy_run_says_healthy_and_exits_0(cli: tuple[Path, dict[str, Proc]]) -> None:
    proc = cli[1]["healthy_text"]
    assert proc.returncode == 0, show(proc)
    text = _flat(proc.stdout)
    assert "✓ healthy at all 20 records (steps 0…190)" in text
    assert "gradient per layer at step 190 (last record), input end first" in text
    assert text.endswith("✓ healthy: no problem at any of the 20 recorded steps")
    assert "◀ onset" not in text and "✗" not in text


def test_cli_json_validates_against_the_schema(cli: tuple[Path, dict[str, Proc]]) -> None:
    out, procs = cli
    errors = _validator()
    assert procs["sick_files"].returncode == 1, show(procs["sick_files"])
    assert procs["healthy_plot"].returncode == 0, show(procs["healthy_plot"])
    sick = json.loads((out / "sick.json").read_text(encoding="utf-8"))
    healthy = json.loads(procs["healthy_plot"].stdout)
    for doc in (sick, healthy):
        assert errors(doc) == []
        assert doc["run"]["checkpoint_kind"] == "training_history" and doc["run"]["device"] == ""
        assert doc["optimisation"] is None and doc["history"]["records"] == len(doc["history"]["steps"])
    assert healthy["status"] == "healthy" and healthy["history"]["onsets"] == []
    assert sick["run"]["loss_value"] == "nan"  # the last record's loss: the run ended in NaN
    assert {o["problem"] for o in sick["history"]["onsets"]} >= {"exploding", "non_finite"}


def test_schema_rejects_a_broken_history(reports: dict[str, Report]) -> None:
    errors = _validator()
    good = json.loads(render_json(reports["sick"]))
    assert errors(good) == [] and errors({**good, "history": None}) == []
    history = good["history"]
    broken = [
        {**history, "steps": [{**history["steps"][0], "grad_norm": "NaN"}]},
        {**history, "onsets": [{**history["onsets"][0], "problem": "wobbly"}]},
        {**history, "onsets": [{**history["onsets"][0], "codes": ["E42"]}]},
        {**history, "problem_steps": [[25, ["wobbly"]]]},
        {**history, "every": 0},
        {k: v for k, v in history.items() if k != "onsets"},
    ]
    for doc in broken:
        assert errors({**good, "history": doc}), doc


def test_cli_writes_markdown_html_and_a_png(cli: tuple[Path, dict[str, Proc]], reports: dict[str, Report]) -> None:
    out, procs = cli
    proc = procs["sick_files"]
    assert proc.returncode == 1, show(proc)
    assert "### Training history" in (out / "sick.md").read_text(encoding="utf-8")
    page = Page((out / "sick.html").read_text(encoding="utf-8"))
    assert page.errors == [] and page.having("section", id="history")
    data = (out / "sick.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    want = report_figure_size(reports["sick"])
    assert abs(width - round(want[0] * DPI)) <= 1 and abs(height - round(want[1] * DPI)) <= 1
    svg = ET.parse(out / "healthy.svg").getroot()
    assert svg.tag.endswith("svg")
    assert not [e for e in svg.iter() if e.get("id", "").startswith("onset-line")]  # nothing began


# ---------------------------------------------------------------- the text chart


@pytest.mark.parametrize("width", [80, 100])
def test_text_chart_has_one_row_per_record_the_onsets_marked(reports: dict[str, Report], width: int) -> None:
    history = _history(reports["sick"])
    text = render_steps_chart(history, width=width)
    assert all(len(line) <= width for line in text.splitlines())
    assert "…" not in text.split("\n✗")[0].replace("steps 0…35", "")  # no column squeezed at 80 columns
    rows = _rows(text)
    assert [int(row.split()[0]) for row in rows] == [r.step for r in history.steps]
    marked = {recorded_step(history.steps, o.step) for o in history.onsets}
    for row in rows:
        step = int(row.split()[0])
        assert ("◀ onset" in row) == (step in marked), row
    assert "|" in rows[0] and "█" not in rows[0]  # the first record is the 1× mark
    assert rows[-1].split()[1:3] == ["nan", "nan"]  # the run ended in NaN: the loss was NaN, not missing
    assert _flat(text).startswith(f"training history: 8 records, steps 0…35, every 5 (from {history.source})")
    header = next(line for line in text.splitlines() if line.startswith("step"))
    for column in ("loss", "‖∂L/∂θ‖", "÷step 0", "gain", "log ±6"):
        assert column in header


def test_text_chart_thins_a_long_history_keeping_first_onset_and_last(reports: dict[str, Report]) -> None:
    history = _history(reports["long"])
    text = render_steps_chart(history)
    assert f"showing {MAX_ROWS} of 60 (first, onsets and last kept)" in text
    steps = [int(row.split()[0]) for row in _rows(text)]
    assert len(steps) == MAX_ROWS and steps == sorted(set(steps))
    onset = recorded_step(history.steps, history.onsets[0].step)
    assert {0, 59, onset} <= set(steps)
    assert any(row.split()[0] == str(onset) and "◀ onset" in row for row in _rows(text))


def test_text_without_a_loss_and_from_a_resumed_run(reports: dict[str, Report]) -> None:
    text = render_text(reports["no_loss"], width=120)
    assert "no loss recorded" in text
    assert all(row.split()[1] == "–" for row in _rows(text))
    resumed = render_text(reports["resumed"], width=120)
    assert "steps 100…120, every 10" in resumed and "÷step 100" in resumed
    assert "gain per layer" in resumed and "at step 100 →" in resumed


def test_an_empty_history_renders_everywhere(reports: dict[str, Report], tmp_path: Path) -> None:
    report = reports["empty"]
    assert "no record yet" in render_text(report)
    assert "### Training history" in render_markdown(report)
    assert Page(render_html(report)).errors == []
    assert _validator()(json.loads(render_json(report))) == []
    plot.plot_report(report, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE


def test_a_problem_training_repaired_reads_as_resolved(reports: dict[str, Report]) -> None:
    """A vanishing onset that later records no longer show: a warning sign, and healthy since."""
    history = _history(reports["healthy"])
    repaired = Onset("vanishing", 0, None, ("GC001",), ("0",), "the gradient at the input end is small", 30)
    report = replace(
        reports["healthy"],
        history=replace(
            history,
            onsets=(repaired,),
            problem_steps=((0, ("vanishing",)), (10, ("vanishing",)), (20, ("vanishing",))),
            verdict="healthy (vanishing until step 30)",
        ),
    )
    text = _flat(render_text(report, width=120))
    assert "⚠ vanishing from step 0 (no healthy record before it) — GC001" in text
    assert "resolved: no record from step 30 on shows it" in text
    assert "✓ healthy from step 30 on (17 records, steps 30…190)" in text
    assert "healthy from step 30 on" in render_markdown(report)
    assert _validator()(json.loads(render_json(report))) == []


# ---------------------------------------------------------------- Markdown


@pytest.mark.parametrize("name", ["sick", "healthy", "long"])
def test_markdown_history_table_has_one_row_per_shown_record(reports: dict[str, Report], name: str) -> None:
    history = _history(reports[name])
    text = render_markdown(reports[name])
    section = text.split("### Training history", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"^\| \d+ \|", line)]
    shown = shown_rows(history.steps, steps_view(history).keep)
    assert [int(row.split("|")[1]) for row in rows] == [history.steps[i].step for i in shown]
    onset_rows = [row for row in rows if "◀ **onset**" in row]
    assert [int(row.split("|")[1]) for row in onset_rows] == _expected_marks(name, history)
    if history.onsets:
        assert "- ❌ " in section and f"from step {history.onsets[0].step}" in section
    else:
        assert "- ✅ healthy at all" in section and "✅ healthy — no problem at any of the 20 recorded steps" in text
    assert "decades per 1000 steps" in section


def test_markdown_header_names_the_run_not_a_seed_or_device(reports: dict[str, Report]) -> None:
    text = render_markdown(reports["sick"])
    head = text.split("### Training history")[0]
    assert "training history from" in head and "8 records every 5 steps" in head
    assert "seed" not in head and "device" not in head
    assert "### Flagged layers at step 25, the first problem" in text


# ---------------------------------------------------------------- HTML


@pytest.mark.parametrize("name", ["sick", "healthy", "long"])
def test_html_history_section_is_self_contained_with_one_point_per_shown_record(
    reports: dict[str, Report], name: str
) -> None:
    report = reports[name]
    history = _history(report)
    html = render_html(report)
    page = Page(html)
    assert page.errors == []
    for tag, attrs in page.elements:
        assert tag not in LOADING_TAGS, tag
        assert not URL_ATTRIBUTES & set(attrs), (tag, attrs)
        href = attrs.get("href")
        assert href is None or href.startswith("#"), href
        if href is not None and len(href) > 1:
            assert any(a.get("id") == href[1:] for _, a in page.elements), href
    assert "://" not in html and "data:" not in html
    assert page.scripts == [SCRIPT]
    (csp,) = page.having("meta", **{"http-equiv": "Content-Security-Policy"})
    assert script_hash() in (csp["content"] or "")
    assert page.having("section", id="history")
    (chart,) = [s for s in svgs(html) if "history" in (s.get("class") or "").split()]
    points = classed(chart, "record")
    shown = history_points(history)
    assert len(points) == len(shown) == min(len(history.steps), MAX_HISTORY_POINTS)
    assert len(classed(chart, "onset")) == len(_expected_marks(name, history))
    red = [p for p in points if "flagged" in (p.get("class") or "").split()]
    assert bool(red) == bool(history.problem_steps)
    section = page.plain.split("Training history", 2)[-1]
    if history.onsets:
        assert f"from step {history.onsets[0].step}" in section
    else:
        assert "healthy at all" in section and "no problem at any of the" in page.plain


def test_html_titles_say_which_record_the_layers_are_from(reports: dict[str, Report]) -> None:
    page = Page(render_html(reports["sick"]))
    step = _history(reports["sick"]).problem_steps[0][0]
    assert f"Layers at step {step} (first problem)" in page.plain
    assert f"Gradient along the path at step {step} (first problem)" in page.plain
    assert "training history" in page.plain and "seed" not in page.plain


# ---------------------------------------------------------------- --plot


def test_plot_draws_the_history_panels_with_the_onsets(reports: dict[str, Report], tmp_path: Path) -> None:
    report = reports["sick"]
    svg = tmp_path / "sick.svg"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph or a collapsed layout fails the test
        plot.plot_report(report, svg)
    root = ET.parse(svg).getroot()
    ids = [e.get("id", "") for e in root.iter() if e.get("id", "").startswith("onset-line")]
    assert len(ids) == len(_expected_marks("sick", _history(report))) and ids[0] == "onset-line"
    without = replace(report, history=None)
    assert report_figure_size(report)[1] > report_figure_size(without)[1]
    text = svg.read_text(encoding="utf-8")
    assert "training step" in text and "gradcheck history" in text
