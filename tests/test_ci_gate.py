"""The CI gate teams wire in: rule selection, baselines, pyproject configuration, several formats, --exit-zero.

Real CLI runs in subprocesses (parallel per fixture), in a directory of their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli_support import assert_one_line_error, run_many, show
from gradcheck_cli.diagnose.rules import RULES
from gradcheck_cli.gate.policy import RULE_CODES

XAVIER = ["inspect", "--example", "relu-xavier"]
KAIMING = ["inspect", "--example", "relu-kaiming"]


def test_policy_knows_every_rule_code():
    assert {rule.code for rule in RULES} == RULE_CODES


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("gate")
    first = run_many({"baseline": [*KAIMING, "--write-baseline", "base.json"]}, cwd=work)
    assert first["baseline"].returncode == 0, show(first["baseline"])
    configured = work / "configured"
    configured.mkdir()
    (configured / "pyproject.toml").write_text('[tool.gradcheck]\nvanishing-below = 1e-9\nfail-on = ["error"]\n')
    (configured / "sub").mkdir()
    broken = work / "broken"
    broken.mkdir()
    (broken / "pyproject.toml").write_text("[tool.gradcheck]\nvanishing_blow = 1e-9\n")
    (work / "strict.toml").write_text("[tool.gradcheck]\nignore = ['GC001', 'GC010']\n")
    runs = run_many(
        {
            "plain": [*XAVIER, "-f", "json"],
            "ignored": [*XAVIER, "--ignore", "GC001,GC010", "-f", "json"],
            "selected": [*XAVIER, "--select", "GC002,GC003", "-f", "json"],
            "ignored_layer": [*XAVIER, "--ignore-layer", "[0-9]*", "-f", "json"],
            "bad_code": [*XAVIER, "--ignore", "GC999"],
            "unchanged": [*KAIMING, "--baseline", "base.json", "-f", "json"],
            "degraded": [*XAVIER, "--baseline", "base.json", "-f", "json"],
            "degraded_loose": [*XAVIER, "--baseline", "base.json", "--tolerance", "20", "--fail-on", "never"],
            "exit_zero": [*XAVIER, "--exit-zero"],
            "several": [*XAVIER, "-f", "json", "-o", "r.json", "-f", "text", "-o", "r.txt", "-f", "markdown"],
            "two_to_stdout": [*XAVIER, "-f", "json", "-f", "text"],
            "bad_baseline": [*XAVIER, "--baseline", "strict.toml"],
            "explicit_config": [*XAVIER, "--config", "strict.toml", "-f", "json"],
        },
        cwd=work,
    )
    runs.update(run_many({"configured": [*XAVIER, "-f", "json"], "override": [*XAVIER, "--vanishing-below", "1e-3"]},
                         cwd=configured / "sub"))  # fmt: skip
    runs.update(run_many({"broken": [*XAVIER]}, cwd=broken))
    return {"dir": work, **runs}


def report_of(proc: Any, code: int) -> dict[str, Any]:
    assert proc.returncode == code, show(proc)
    return json.loads(proc.stdout)


def test_ignore_by_code_drops_the_finding_its_advice_and_passes_the_gate(runs):
    assert report_of(runs["plain"], 1)["problems"] == ["vanishing"]
    ignored = report_of(runs["ignored"], 0)
    assert ignored["findings"] == [] and ignored["recommendations"] == [] and ignored["verifications"] == []
    assert any("left out" in note for note in ignored["notes"])
    assert report_of(runs["selected"], 0)["problems"] == []


def test_ignore_layer_pattern_drops_findings_about_matching_layers(runs):
    report = report_of(runs["ignored_layer"], 0)
    assert all(not layer["flags"] for layer in report["layers"])


def test_unknown_rule_code_is_exit_2(runs):
    assert_one_line_error(runs["bad_code"], "GC999", "no such rule code")


def test_baseline_passes_unchanged_and_fails_degraded_with_the_diff_in_the_report(runs):
    same = report_of(runs["unchanged"], 0)
    assert same["baseline"]["regressed"] is False and same["baseline"]["new_findings"] == []
    worse = report_of(runs["degraded"], 1)
    diff = worse["baseline"]
    assert diff["regressed"] is True
    assert [f["code"] for f in diff["new_findings"]] == ["GC001", "GC010"]  # the vanishing and its cause
    assert diff["worse_layers"] and all(move["orders"] < -1 for move in diff["worse_layers"])
    assert runs["degraded_loose"].returncode == 0, show(runs["degraded_loose"])


def test_baseline_that_is_not_a_report_is_exit_2(runs):
    assert_one_line_error(runs["bad_baseline"], "strict.toml", "not a gradcheck JSON report")


def test_exit_zero_is_advisory(runs):
    assert runs["exit_zero"].returncode == 0
    assert "unhealthy: vanishing" in runs["exit_zero"].stdout


def test_several_formats_in_one_run(runs):
    proc = runs["several"]
    assert proc.returncode == 1, show(proc)
    work: Path = runs["dir"]
    assert json.loads((work / "r.json").read_text())["problems"] == ["vanishing"]
    assert "GC001" in (work / "r.txt").read_text()
    assert "GC001" in proc.stdout and "kaiming_init" in proc.stdout  # markdown on stdout
    assert_one_line_error(runs["two_to_stdout"], "only one --format can go to stdout")


def test_pyproject_configuration_changes_the_verdict_and_flags_override_it(runs):
    configured = report_of(runs["configured"], 0)
    assert configured["problems"] == [] and configured["thresholds"]["vanishing_attenuation"] == 1e-9
    assert runs["override"].returncode == 1, show(runs["override"])
    assert_one_line_error(runs["broken"], "unknown key 'vanishing_blow'", "vanishing-below")
    explicit = report_of(runs["explicit_config"], 0)
    assert explicit["findings"] == []


def test_github_format_prints_workflow_commands_and_appends_the_step_summary(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    proc = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", *XAVIER, "--format", "github"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, show(proc)
    assert proc.stdout.startswith("::error title=GC001 vanishing-gradient")
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "GC001" in text and "kaiming_init" in text


def test_baseline_matches_path_findings_by_code_so_an_improvement_passes(tmp_path: Path) -> None:
    """A deeper-reaching but still vanishing gradient moves GC001's crossing layer: not a new finding."""
    from dataclasses import replace as replaced

    from gradcheck_cli.api import check
    from gradcheck_cli.gate.baseline import compare, write_baseline
    from gradcheck_cli.load.examples import EXAMPLES

    model, batch = EXAMPLES["relu-xavier"].build(0)
    report = check(model, batch)
    write_baseline(report, tmp_path / "b.json")
    moved = replaced(report, findings=tuple(replaced(f, layer="2") for f in report.findings))
    diff = compare(moved, tmp_path / "b.json").baseline
    assert diff is not None and diff.new_findings == () and not diff.regressed


def test_baseline_counts_a_collapse_to_zero_and_a_severity_increase_as_worse(tmp_path: Path) -> None:
    from dataclasses import replace as replaced

    from gradcheck_cli.api import check
    from gradcheck_cli.gate.baseline import compare, write_baseline
    from gradcheck_cli.load.examples import EXAMPLES
    from gradcheck_cli.report.report import Severity

    model, batch = EXAMPLES["relu-xavier"].build(0)
    report = check(model, batch)
    write_baseline(replaced(report, findings=tuple(replaced(f, severity=Severity.WARNING) for f in report.findings)),
                   tmp_path / "b.json")  # fmt: skip
    escalated = compare(report, tmp_path / "b.json").baseline
    assert escalated is not None and [f.code for f in escalated.new_findings] == ["GC001"]
    write_baseline(report, tmp_path / "same.json")
    collapsed = replaced(report, layers=(replaced(report.layers[0], act_grad_rel=0.0), *report.layers[1:]))
    diff = compare(collapsed, tmp_path / "same.json").baseline
    assert diff is not None and [m.layer for m in diff.worse_layers] == [report.layers[0].name]


def test_ignoring_one_layer_does_not_hide_a_vanishing_path():
    from gradcheck_cli.api import check
    from gradcheck_cli.gate.policy import Policy
    from gradcheck_cli.load.examples import EXAMPLES

    model, batch = EXAMPLES["relu-xavier"].build(0)
    report = check(model, batch)
    crossing = report.findings[0].layer
    assert crossing is not None
    assert Policy.build(ignore_layers=[crossing]).apply(report).problems == report.problems
    assert Policy.build(ignore_layers=["*"]).apply(report).problems == ()


def test_outputs_pair_with_the_format_written_before_them(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", *KAIMING, "-f", "github", "-f", "sarif", "-o", "g.sarif"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, show(proc)
    assert json.loads((tmp_path / "g.sarif").read_text())["version"] == "2.1.0"
    assert proc.stdout.startswith("::notice")


def test_configured_model_does_not_block_examples_and_write_baseline_skips_the_configured_one(tmp_path: Path):
    import subprocess
    import sys

    (tmp_path / "pyproject.toml").write_text('[tool.gradcheck]\nmodel = "nets.py:build"\nbaseline = "base.json"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", *KAIMING, "--write-baseline", "base.json"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, show(proc)
    assert json.loads((tmp_path / "base.json").read_text())["status"] == "healthy"


def test_every_configuration_key_sets_the_default_of_an_inspect_flag() -> None:
    import inspect as python_inspect

    from gradcheck_cli.cli.config_defaults import PARAMETERS
    from gradcheck_cli.cli.inspect_cmd import inspect
    from gradcheck_cli.gate.config import KEYS

    assert set(PARAMETERS) == set(KEYS)
    assert set(PARAMETERS.values()) <= set(python_inspect.signature(inspect).parameters)


def test_flags_win_over_the_configuration_by_clicks_rule_and_outputs_pair_as_click_parsed_them(tmp_path: Path) -> None:
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "pyproject.toml").write_text("[tool.gradcheck]\nseed = -1\n")
    (tmp_path / "broken.toml").write_text("[tool.gradcheck]\nvanishing_blow = 1e-9\n")
    runs = run_many(
        {
            "flag_wins": [*KAIMING, "--no-verify", "--seed", "5", "-f", "json"],  # the bad seed is never used
            "configured": [*KAIMING, "--no-verify"],
        },
        cwd=configured,
    )
    runs |= run_many(
        {
            "spellings": [*KAIMING, "--no-verify", "--format=github", "-fsarif", "-og.sarif"],
            "debug": [*KAIMING, "--config", "broken.toml", "--debug"],
        },
        cwd=tmp_path,
    )
    assert report_of(runs["flag_wins"], 0)["run"]["seed"] == 5
    assert_one_line_error(runs["configured"], "seed", "pyproject.toml")
    assert runs["spellings"].returncode == 0, show(runs["spellings"])
    assert runs["spellings"].stdout.startswith("::notice")
    assert json.loads((tmp_path / "g.sarif").read_text())["version"] == "2.1.0"
    debug = runs["debug"]
    assert debug.returncode == 2 and "Traceback" in debug.stderr, show(debug)
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: unknown key 'vanishing_blow'")
