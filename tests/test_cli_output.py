"""The real CLI's terminal output: readable when piped, colour only where wanted, errors on stderr."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

COLOUR = re.compile(r"\x1b\[(3[0-7]|9[0-7]|38;)")


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", *args], capture_output=True, text=True, env=environment, timeout=120
    )


def test_piped_text_report_is_plain_and_complete():
    proc = run("inspect", "--example", "relu-xavier")
    assert proc.returncode == 1
    assert "\x1b[" not in proc.stdout
    assert "GC001" in proc.stdout and "kaiming_init" in proc.stdout
    assert proc.stdout.rstrip().endswith("✗ unhealthy: vanishing")
    assert proc.stderr == ""


def test_forced_colour_is_removed_by_no_color():
    coloured = run("inspect", "--example", "relu-kaiming", FORCE_COLOR="1")
    assert COLOUR.search(coloured.stdout)
    plain = run("inspect", "--example", "relu-kaiming", FORCE_COLOR="1", NO_COLOR="1")
    assert plain.returncode == 0
    assert not COLOUR.search(plain.stdout)
    assert "✓ healthy" in plain.stdout


def test_example_list_names_every_example():
    from gradcheck_cli.load.examples import EXAMPLES

    proc = run("inspect", "--example", "list")
    assert proc.returncode == 0 and proc.stderr == ""
    # one line per example, in order: its name, the problem it shows and what it is
    listed = [line.split(None, 2) for line in proc.stdout.splitlines()]
    assert [row[0] for row in listed] == list(EXAMPLES)
    assert listed == [[e.name, e.expected, e.summary] for e in EXAMPLES.values()]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("inspect",), "either a CHECKPOINT or --example"),
        (("inspect", "--example", "nope"), "unknown example"),
        (("inspect", "--example", "residual", "--vanishing-below", "2"), "thresholds"),
        (("inspect", "--example", "residual", "--device", "cuda:0"), "--device"),
        (("inspect", "--no-such-flag"), "No such option"),
    ],
)
def test_bad_flags_exit_2_with_a_message_and_no_traceback(args, needle):
    proc = run(*args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_text_output_file_is_plain_and_the_verdict_goes_to_stderr(tmp_path):
    out = tmp_path / "report.txt"
    proc = run("inspect", "--example", "deep-linear", "--output", str(out))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "unhealthy: exploding" in proc.stderr
    text = out.read_text(encoding="utf-8")
    assert "GC002" in text and "\x1b[" not in text


def test_eval_and_seed_are_reported():
    proc = run("inspect", "--example", "residual", "--eval", "--seed", "5", "--format", "json")
    data = json.loads(proc.stdout)
    assert data["run"]["mode"] == "eval" and data["run"]["seed"] == 5
