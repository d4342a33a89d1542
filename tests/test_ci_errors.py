"""Issue 19, the CI job: recording a baseline accepts the state it records, a baseline run with nothing new
says why it passes, every machine format gets a document a consumer can parse when gradcheck cannot run, and
a piped text report keeps code whole. All through the real CLI, on built-in models and files made with torch.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch

from cli_support import CLI_ENV, assert_one_line_error, json_report, run_cli, show

SIGMOID = ["inspect", "--example", "deep-sigmoid", "--no-verify"]
XAVIER = ["inspect", "--example", "relu-xavier", "--no-verify"]
KAIMING = ["inspect", "--example", "relu-kaiming", "--no-verify"]
HERE = Path(__file__).resolve().parent
REPORT_SCHEMA = HERE.parent / "docs" / "report.schema.json"
SARIF_SCHEMA = HERE / "schemas" / "sarif-schema-2.1.0.json"


def _last_line(text: str) -> str:
    return text.rstrip().splitlines()[-1]


# ------------------------------------------------------------------------------------------- baselines


def test_write_baseline_accepts_an_unhealthy_model_exit_0_verdict_still_shown(tmp_path: Path) -> None:
    proc = run_cli([*SIGMOID, "--write-baseline", "base.json"], cwd=tmp_path)
    assert proc.returncode == 0, show(proc)
    assert _last_line(proc.stdout) == "✗ unhealthy: vanishing", show(proc)
    assert "baseline written to base.json" in proc.stderr and "accepted" in proc.stderr, show(proc)
    stored = json.loads((tmp_path / "base.json").read_text(encoding="utf-8"))
    assert stored["status"] == "unhealthy" and stored["findings"]


def test_a_baseline_run_with_nothing_new_says_so_and_why_it_passes(tmp_path: Path) -> None:
    assert run_cli([*SIGMOID, "--write-baseline", "base.json"], cwd=tmp_path).returncode == 0
    text = run_cli([*SIGMOID, "--baseline", "base.json"], cwd=tmp_path)
    assert text.returncode == 0, show(text)
    verdict = " ".join(text.stdout.split()[-40:])  # the verdict line, however the terminal wrapped it
    assert "✗ unhealthy: vanishing; nothing new against the baseline base.json" in verdict, show(text)
    assert "were already in the baseline" in verdict and "so the gate passes" in verdict, show(text)
    markdown = run_cli([*SIGMOID, "--baseline", "base.json", "-f", "markdown"], cwd=tmp_path)
    assert "nothing new against the baseline" in markdown.stdout.splitlines()[0], show(markdown)
    github = run_cli([*SIGMOID, "--baseline", "base.json", "-f", "github"], cwd=tmp_path)
    closing = next(line for line in github.stdout.splitlines() if line.startswith("::notice title=gradcheck::"))
    assert "unhealthy: vanishing" in closing and "nothing new against the baseline" in closing, show(github)
    html = run_cli([*SIGMOID, "--baseline", "base.json", "-f", "html"], cwd=tmp_path)
    banner = html.stdout.split("</header>")[0]
    assert "nothing new against the baseline" in banner and "so the gate passes" in banner


def test_a_regression_is_named_in_the_verdict_and_fails(tmp_path: Path) -> None:
    assert run_cli([*KAIMING, "--write-baseline", "healthy.json"], cwd=tmp_path).returncode == 0
    proc = run_cli([*XAVIER, "--baseline", "healthy.json"], cwd=tmp_path)
    assert proc.returncode == 1, show(proc)
    assert "regressed against the baseline healthy.json" in " ".join(proc.stdout.split()[-30:]), show(proc)


def test_write_baseline_beside_an_explicit_baseline_is_judged_against_that_one(tmp_path: Path) -> None:
    assert run_cli([*KAIMING, "--write-baseline", "healthy.json"], cwd=tmp_path).returncode == 0
    proc = run_cli([*XAVIER, "--baseline", "healthy.json", "--write-baseline", "next.json"], cwd=tmp_path)
    assert proc.returncode == 1, show(proc)  # the comparison regressed: recording a new one does not hide it
    assert (tmp_path / "next.json").is_file()


# ------------------------------------------------------------------------------------ error documents


def _validator(path: Path, kind: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    return getattr(jsonschema, kind)(json.loads(path.read_text(encoding="utf-8")))


def _error_line(proc: Any, needle: str) -> None:
    """Exit 2, no traceback, exactly one ``error: …`` line on stderr holding ``needle``."""
    assert proc.returncode == 2, show(proc)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], show(proc)


def test_json_error_document_is_on_stdout_and_in_the_schema(tmp_path: Path) -> None:
    proc = run_cli(["inspect", "missing.pt", "-f", "json"], cwd=tmp_path)
    _error_line(proc, "checkpoint not found")
    data = json.loads(proc.stdout)
    assert data == {"schema_version": 1, "status": "error", "code": 2, "message": "checkpoint not found: missing.pt"}
    validator = _validator(REPORT_SCHEMA, "Draft202012Validator")
    assert not list(validator.iter_errors(data))
    assert not validator.is_valid({**data, "code": 1})  # exit 1 is a report, never an error document
    assert not validator.is_valid({**data, "extra": 1})


def test_sarif_error_is_a_failed_invocation_with_a_notification(tmp_path: Path) -> None:
    proc = run_cli(["inspect", "missing.pt", "-f", "sarif"], cwd=tmp_path)
    _error_line(proc, "checkpoint not found")
    log = json.loads(proc.stdout)
    assert not list(_validator(SARIF_SCHEMA, "Draft4Validator").iter_errors(log))
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False and invocation["exitCode"] == 2
    (notification,) = invocation["toolExecutionNotifications"]
    assert notification["level"] == "error" and "missing.pt" in notification["message"]["text"]
    assert log["runs"][0]["results"] == []


def test_junit_error_is_an_error_test_case_and_github_an_error_command(tmp_path: Path) -> None:
    junit = run_cli(["inspect", "missing.pt", "-f", "junit"], cwd=tmp_path)
    _error_line(junit, "checkpoint not found")
    root = ET.fromstring(junit.stdout)
    assert root.get("errors") == "1" and root.get("failures") == "0"
    error = root.find("testsuite/testcase/error")
    assert error is not None and error.get("type") == "exit-2" and "missing.pt" in (error.get("message") or "")
    github = run_cli(["inspect", "missing.pt", "-f", "github"], cwd=tmp_path)
    _error_line(github, "checkpoint not found")
    assert github.stdout == "::error title=gradcheck could not run (exit 2)::checkpoint not found: missing.pt\n"


@pytest.mark.parametrize("kind", ["text", "markdown", "html"])
def test_human_formats_keep_the_stderr_line_only(tmp_path: Path, kind: str) -> None:
    assert_one_line_error(run_cli(["inspect", "missing.pt", "-f", kind], cwd=tmp_path), "checkpoint not found")


def test_an_output_file_gets_the_error_document_never_a_stale_report(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text('{"status": "healthy", "from": "yesterday"}', encoding="utf-8")
    (tmp_path / "r.md").write_text("## gradcheck: ✅ healthy\n", encoding="utf-8")
    proc = run_cli(
        ["inspect", "missing.pt", "-f", "json", "-o", "r.json", "-f", "markdown", "-o", "r.md"], cwd=tmp_path
    )
    _error_line(proc, "checkpoint not found")
    assert proc.stdout == ""
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["status"] == "error"
    assert "healthy" not in (tmp_path / "r.md").read_text(encoding="utf-8")


def test_an_output_refused_before_the_checks_is_never_written(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), weights)
    before = weights.read_bytes()
    proc = run_cli(["inspect", "weights.pt", "-f", "json", "-o", "weights.pt"], cwd=tmp_path)
    _error_line(proc, "--output")
    assert weights.read_bytes() == before and proc.stdout == ""
    stdout_too = run_cli(["inspect", "weights.pt", "-f", "sarif", "-o", "weights.pt", "-f", "json"], cwd=tmp_path)
    assert stdout_too.returncode == 2 and json.loads(stdout_too.stdout)["status"] == "error", show(stdout_too)
    assert weights.read_bytes() == before


def test_a_flag_error_and_a_simulate_error_print_the_json_document(tmp_path: Path) -> None:
    flag = run_cli([*XAVIER, "-f", "json", "--seed", "-1"], cwd=tmp_path)
    assert flag.returncode == 2 and json.loads(flag.stdout)["code"] == 2, show(flag)
    simulate = run_cli(["simulate", "--factor", "0", "--format", "json"], cwd=tmp_path)
    _error_line(simulate, "--factor")
    assert json.loads(simulate.stdout)["message"].startswith("--factor must be a positive number")


def test_an_internal_error_prints_a_json_document_with_code_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if CLI_ENV.get("GRADCHECK_TEST_SUBPROCESS") == "1":
        pytest.skip("patches the pipeline in this process")
    import gradcheck_cli.pipeline

    def broken(request: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gradcheck_cli.pipeline, "run_inspect", broken)
    proc = run_cli([*XAVIER, "-f", "json", "-o", "r.json"], cwd=tmp_path)
    assert proc.returncode == 3 and "Traceback" in proc.stderr, show(proc)
    data = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert data["status"] == "error" and data["code"] == 3 and "RuntimeError: a bug" in data["message"]


def test_a_successful_run_is_unchanged(tmp_path: Path) -> None:
    data = json_report(run_cli([*KAIMING, "-f", "json"], cwd=tmp_path))
    assert data["status"] == "healthy"


# ------------------------------------------------------------------------------------------ wrapping


@pytest.mark.parametrize("columns", [None, "60"])
def test_piped_text_keeps_every_snippet_line_whole(tmp_path: Path, columns: str | None) -> None:
    if columns is None and "COLUMNS" in CLI_ENV:
        pytest.skip("COLUMNS is set in this environment")
    env = {"COLUMNS": columns} if columns else None
    data = json_report(run_cli([*SIGMOID, "-f", "json"], cwd=tmp_path), exit_code=1)
    proc = run_cli(SIGMOID, cwd=tmp_path, env=env)
    assert proc.returncode == 1, show(proc)
    lines = [line.rstrip() for line in proc.stdout.splitlines()]
    snippets = [line for rec in data["recommendations"] for line in rec["snippet"].splitlines() if line.strip()]
    assert any("nn.init.xavier_normal_(m.weight, gain=" in line for line in snippets)
    missing = [line for line in snippets if "   " + line not in lines]
    assert missing == [], show(proc)
    if columns is None:  # piped: the width of a report file, not a terminal's 80 columns
        widest = max(len(line) for line in lines if not any(line == "   " + s for s in snippets))
        assert 80 < widest <= 110, show(proc)
