"""The pictures through the real CLI: ``--plot`` on inspect and simulate, ``--format html``."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from cli_support import assert_one_line_error, run_many, show
from gradcheck_cli.simulate.network import REMEDIES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMPARE = [
    "simulate",
    "--depth",
    "20",
    "--activation",
    "relu",
    "--init",
    "xavier_normal",
    "--width",
    "64",
    "--seeds",
    "1",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("pictures")
    (work / "batch.pt").write_bytes(b"not a batch")
    procs = run_many(
        {
            "png": ["inspect", "--example", "relu-xavier", "--no-verify", "--plot", "flow.png"],
            "html": ["inspect", "--example", "relu-xavier", "-f", "html", "-o", "report.html"],
            "simulate": [*COMPARE, "--compare", "--plot", "compare.svg"],
            "simulate_json": [*COMPARE, "--compare", "--format", "json"],
            "chain": ["simulate", "--depth", "50", "--factor", "0.8", "--plot", "chain.png"],
            "bad_suffix": ["inspect", "--example", "relu-kaiming", "--plot", "flow.gif"],
            "same_file": ["simulate", "--depth", "10", "--factor", "0.9", "--plot", "x.svg", "-o", "x.svg"],
        },
        cwd=work,
    )
    return {"dir": work, **procs}


def test_inspect_plot_writes_a_png_and_keeps_the_exit_code(runs: dict[str, Any]) -> None:
    proc = runs["png"]
    assert proc.returncode == 1, show(proc)  # relu-xavier is sick: the picture does not change the gate
    data = (runs["dir"] / "flow.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert "chart written to flow.png" in proc.stderr


def test_html_report_is_one_self_contained_file(runs: dict[str, Any]) -> None:
    proc = runs["html"]
    assert proc.returncode == 1, show(proc)
    page = (runs["dir"] / "report.html").read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "<svg" in page and "kaiming_init" in page and "GC001" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page


def test_simulate_plots_every_remedy_as_svg_and_chain_mode_as_png(runs: dict[str, Any]) -> None:
    assert runs["simulate"].returncode == 0, show(runs["simulate"])
    root = ET.parse(runs["dir"] / "compare.svg").getroot()  # well-formed SVG
    # one line per row of the same comparison's JSON (as given and each remedy), by rank
    assert runs["simulate_json"].returncode == 0, show(runs["simulate_json"])
    rows = json.loads(runs["simulate_json"].stdout)["rows"]
    assert sorted(row["remedy"] for row in rows) == sorted(["as given", *REMEDIES])
    assert all(0 < row["gain"] < math.inf for row in rows)  # every row can be drawn
    lines = [e.get("id") for e in root.iter() if (e.get("id") or "").startswith("remedy-line-")]
    assert sorted(lines) == sorted(f"remedy-line-{row['rank']}" for row in rows)
    assert len(lines) == len(set(lines)) == len(rows)
    assert runs["chain"].returncode == 0, show(runs["chain"])
    assert (runs["dir"] / "chain.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bad_plot_paths_are_one_line_errors(runs: dict[str, Any]) -> None:
    assert_one_line_error(runs["bad_suffix"], ".png", ".svg")
    assert_one_line_error(runs["same_file"], "--plot and --output name the same file")


def test_plot_never_replaces_an_input(tmp_path: Path) -> None:
    from cli_support import run_cli, save_inputs

    save_inputs(tmp_path)
    before = (tmp_path / "x.pt").read_bytes()
    proc = run_cli(["inspect", "x.pt", "-m", "cli_models:make_tiny", "--plot", "x.pt"], cwd=tmp_path)
    assert proc.returncode == 2 and "--plot x.pt is one of the input files" in proc.stderr, show(proc)
    assert (tmp_path / "x.pt").read_bytes() == before
