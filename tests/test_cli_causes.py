"""The cause signals and the proof of a fix through the real CLI: flags, JSON keys, terminal text, exit codes."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from cli_support import assert_one_line_error, checkpoint_model, json_report, run_many, save_inputs, show

STEPS = ["inspect", "--example", "relu-kaiming", "--steps", "3", "--lr", "0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("causes")
    save_inputs(work)
    model = checkpoint_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "epoch": 3},
               work / "trained.pt")  # fmt: skip
    torch.save({"model_state_dict": model.state_dict()}, work / "weights_only.pt")
    tiny = ["-i", "xy_index.pt", "-m", "cli_models:make_tiny", "-f", "json"]
    return run_many(
        {
            "dead": ["inspect", "--example", "dead-relu", "-f", "json"],
            "dead_text": ["inspect", "--example", "dead-relu"],
            "no_verify": ["inspect", "--example", "dead-relu", "--no-verify", "-f", "json"],
            "nan": ["inspect", "--example", "nan-weight"],
            "bf16": ["inspect", "--example", "relu-kaiming", "--autocast", "bf16", "--device", "auto", "-f", "json"],
            "steps": [*STEPS, "--optimizer", "adam", "-f", "json"],
            "steps_text": ["inspect", "--example", "deep-linear", "--steps", "4", "--lr", "0.5", "--no-verify"],
            "bad_autocast": ["inspect", "--example", "relu-kaiming", "--autocast", "fp8"],
            "bad_lr": ["inspect", "--example", "relu-kaiming", "--steps", "2", "--lr", "0"],
            "bad_steps": ["inspect", "--example", "relu-kaiming", "--steps", "-1"],
            "lr_alone": ["inspect", "--example", "relu-kaiming", "--lr", "0.5"],
            "profile": ["inspect", "--example", "relu-xavier", "--profile", "-f", "json"],
            "trained": ["inspect", "trained.pt", *tiny],
            "untrained": ["inspect", "weights_only.pt", *tiny],
        },
        cwd=work,
    )


def test_dead_relu_example_names_the_cause_and_the_verified_fix(runs: dict[str, Any]) -> None:
    report = json_report(runs["dead"], exit_code=1)
    codes = [f["code"] for f in report["findings"]]
    assert codes[0] == "GC001" and "GC012" in codes
    dead = next(a for a in report["activations"] if a["layer"] == "7")
    assert dead["dead"] == 1.0 and dead["flag"] == "dead"
    first = report["verifications"][0]
    assert first["id"] == report["recommendations"][0]["id"] == "kaiming_init"
    assert first["verified"] and first["fixed"] and first["after"]["status"] == "healthy"
    text = runs["dead_text"].stdout
    assert "activations: 7 ReLU" in text and "dead units up to 100%" in text
    assert "verified on a copy: attenuation 0 →" in text and "healthy" in text


def test_no_verify_skips_the_copies(runs: dict[str, Any]) -> None:
    report = json_report(runs["no_verify"], exit_code=1)
    assert report["recommendations"] and report["verifications"] == []


def test_first_non_finite_is_named_in_the_terminal(runs: dict[str, Any]) -> None:
    proc = runs["nan"]
    assert proc.returncode == 1, show(proc)
    assert "first non-finite: forward in 2 (Linear), whose 2.weight is NaN/Inf" in proc.stdout
    assert "input 0: 64×64, 0 NaN, 0 Inf" in proc.stdout


def test_autocast_and_optimisation_probe_flags(runs: dict[str, Any]) -> None:
    bf16 = json_report(runs["bf16"], exit_code=0)
    assert bf16["precision"]["autocast"] == "bf16"
    assert bf16["run"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")  # --device auto
    steps = json_report(runs["steps"], exit_code=0)
    trace = steps["optimisation"]
    assert trace["optimizer"] == "adam" and trace["lr"] == 0.01 and trace["verdict"] == "stable"
    assert [s["step"] for s in trace["steps"]] == [0, 1, 2, 3]
    text = runs["steps_text"].stdout
    assert "optimisation probe: SGD, lr 0.5" in text and "GC015" in text
    assert runs["steps_text"].returncode == 1, show(runs["steps_text"])


def test_bad_flags_exit_2_without_a_traceback(runs: dict[str, Any]) -> None:
    assert_one_line_error(runs["bad_lr"], "lr")
    assert_one_line_error(runs["lr_alone"], "--lr and --optimizer set the optimisation probe", "--steps N")
    for name, needle in (("bad_autocast", "'fp8' is not one of 'fp16', 'bf16'"), ("bad_steps", "--steps")):
        proc = runs[name]  # Typer's own usage errors: usage line, hint and message, exit 2
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, show(proc)


def test_checkpoint_with_optimizer_state_skips_the_init_audit(runs: dict[str, Any]) -> None:
    trained = json_report(runs["trained"], exit_code=0)
    skipped = trained["init_audit"]["skipped"]
    assert "optimizer state ('optimizer_state_dict')" in skipped and "epoch 3" in skipped
    assert not any(f["code"] == "GC010" for f in trained["findings"])
    fresh = json_report(runs["untrained"], exit_code=0)
    assert fresh["init_audit"]["skipped"] is None
    assert [layer["layer"] for layer in fresh["init_audit"]["layers"]] == ["fc1", "fc2"]


def test_profile_splits_the_time_into_phases(runs: dict[str, Any]) -> None:
    proc = runs["profile"]
    report = json_report(proc, exit_code=1)
    timing = report["timing"]
    assert list(timing) == ["startup", "import", "load", "probe", "diagnose", "verify"]  # first-seen order
    # each phase did real work: the probe ran once, the verification re-probed a copy per recommendation (their
    # durations are not compared: a warm re-probe can take as long as the process's first, cold probe)
    assert timing["probe"] > 0 and timing["diagnose"] > 0 and timing["verify"] > 0
    assert len(report["verifications"]) == len(report["recommendations"]) >= 2
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("profile:")]
    whole = re.fullmatch(r"profile: (.*); (\d+\.\d\d) s in all", line)
    assert whole, line
    split, total = whole.groups()
    phases = dict(re.findall(r"(\w+) (\d+\.\d\d) s", split))
    assert list(phases) == [*timing, "render"] and split.count(", ") == len(phases) - 1
    assert all(phases[name] == f"{seconds:.2f}" for name, seconds in timing.items())  # the same numbers
    assert float(total) == pytest.approx(sum(map(float, phases.values())), abs=0.01 * len(phases))
    assert json_report(runs["dead"], exit_code=1)["timing"] is None  # only with --profile
