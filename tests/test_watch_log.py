"""watch()'s JSON-lines log and ``gradcheck history``: crashes, damaged files, exit codes, and review findings."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_support import assert_one_line_error, run_cli
from gradcheck_cli import watch
from gradcheck_cli.report.report import Problem
from gradcheck_cli.training.history import history_report
from gradcheck_cli.training.log import read_history
from gradcheck_cli.training.monitor import GradientWarning
from watch_support import regression_data, tanh_mlp, train

# ------------------------------------------------------------------ the log file and the CLI


def test_log_survives_a_crash_and_keeps_earlier_runs(tmp_path: Path) -> None:
    log = tmp_path / "grads.jsonl"
    for _ in range(2):
        model = tanh_mlp()
        with watch(model, every=2, log=log) as w:
            train(model, w, 6)
    with log.open("a") as handle:
        handle.write('{"kind": "record", "step": 99, "layers": [{"na')  # the crash mid-write
    history = read_history(log)
    assert history.earlier_runs == 1 and history.skipped_lines == 1
    assert [r.step for r in history.records] == [0, 2, 4]
    lines = log.read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "header" for line in lines[:-1]) == 2


def test_history_cli_exit_codes_and_formats(tmp_path: Path) -> None:
    healthy_log, sick_log = tmp_path / "healthy.jsonl", tmp_path / "sick.jsonl"
    model = tanh_mlp()
    with watch(model, every=5, log=healthy_log) as w:
        train(model, w, 30)
    model = tanh_mlp()
    with warnings.catch_warnings(), watch(model, every=1, log=sick_log) as w:
        warnings.simplefilter("ignore", GradientWarning)
        train(model, w, 30, blow_up_at=15)
    ok = run_cli(["history", healthy_log], cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    sick = run_cli(["history", sick_log, "--format", "json"], cwd=tmp_path)
    assert sick.returncode == 1, sick.stderr
    report = json.loads(sick.stdout)
    assert "exploding" in report["problems"]
    onsets = {o["problem"]: o["step"] for o in report["history"]["onsets"]}
    assert onsets["exploding"] == 16
    advisory = run_cli(["history", sick_log, "--exit-zero"], cwd=tmp_path)
    assert advisory.returncode == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("not json at all\n", "not a gradcheck history"),
        ('{"kind": "header", "format": "gradcheck-history", "version": 99}\n', "newer gradcheck"),
    ],
)
def test_history_cli_refuses_bad_files_in_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "grads.jsonl"
    if content is not None:
        path.write_text(content)
    proc = run_cli(["history", path], cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    if content is not None:
        assert path.read_text() == content, "the user's file is left as it was"


def test_frozen_layers_below_the_trained_ones_are_not_a_cut_graph() -> None:
    model = tanh_mlp()
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)  # fine-tuning: the first two layers frozen
    x, y = regression_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)
        with watch(model, every=1) as w:
            for _ in range(3):
                nn.functional.mse_loss(model(x), y).backward()
                assessment = w.step()
                assert assessment is not None and not assessment.problems, assessment.findings
                model.zero_grad()
    assert assessment.diagnosis.path.first_layer == "4"


# ------------------------------------------------------------------ review findings, pinned


def test_a_nan_loss_after_the_last_record_is_still_reported(tmp_path: Path) -> None:
    model = tanh_mlp()
    log = tmp_path / "grads.jsonl"
    x, y = regression_data()
    with pytest.warns(GradientWarning, match="after the last recorded step"), watch(model, every=50, log=log) as w:
        for step in range(60):
            batch = x.clone()
            if step == 55:
                batch[0, 0] = math.nan
            loss = nn.functional.mse_loss(model(batch), y)
            if not math.isfinite(loss.item()):
                w.step(loss)
                break  # the usual guard: the loop stops before the next record
            loss.backward()
            w.step(loss)
            model.zero_grad()
    report = history_report(log)
    assert not report.healthy and report.history is not None
    onset = next(o for o in report.history.onsets if o.problem == "non_finite")
    assert (onset.step, onset.last_healthy_step) == (55, 50)


def test_a_disabled_grad_scaler_does_not_excuse_nan_gradients(tmp_path: Path) -> None:
    model = tanh_mlp()
    log = tmp_path / "grads.jsonl"
    x, y = regression_data()
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # GradScaler(enabled=use_amp) with AMP off
    with warnings.catch_warnings(), watch(model, every=1, log=log, scaler=scaler) as w:
        warnings.simplefilter("ignore", GradientWarning)
        for step in range(3):
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            if step == 2:  # √0 has an infinite derivative: the loss stays finite, its gradient turns NaN
                loss = loss + (out * 0).abs().sqrt().sum()
            loss.backward()
            w.step(loss)
            model.zero_grad()
    assert [p.value for p in w.records[2].problems] == ["non_finite"]
    report = history_report(log)
    assert "non_finite" in [p.value for p in report.problems], "history agrees with the live verdict"
    assert not any("GradScaler" in note for note in report.notes)


def test_a_run_that_vanishes_throughout_can_still_spike(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))  # default init: vanishing from the start
    log = tmp_path / "grads.jsonl"
    x, y = regression_data()
    with warnings.catch_warnings(), watch(model, every=1, log=log) as w:
        warnings.simplefilter("ignore", GradientWarning)
        for step in range(20):
            if step == 12:
                with torch.no_grad():
                    model[-1].weight.mul_(1e4)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.step(loss)
            model.zero_grad()
    assert "vanishing" in {p.value for a in list(w.records)[:12] for p in a.problems}
    report = history_report(log)
    assert report.history is not None
    onsets = {o.problem: o for o in report.history.onsets}
    assert onsets["exploding"].step == 12 and onsets["vanishing"].step == 0
    assert report.history.clip_max_norm is not None, "the vanishing records are calm enough for the median"


def test_entering_the_same_watch_again_continues_one_run(tmp_path: Path) -> None:
    model = tanh_mlp()
    log = tmp_path / "grads.jsonl"
    w = watch(model, every=1, log=log)
    for _epoch in range(3):
        with w:
            train(model, w, 2)
    history = read_history(log)
    assert history.earlier_runs == 0
    assert [r.step for r in history.records] == list(range(6))


def test_step_without_backward_says_so() -> None:
    model = tanh_mlp()
    with watch(model, every=1) as w:
        assessment = w.step()
    assert assessment is not None
    assert [f.code for f in assessment.findings] == ["GC005"]
    assert "no gradient reached the model since the previous step()" in assessment.findings[0].message


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            '{"kind": "header", "format": "gradcheck-history", "version": "2"}',
            "the history header's version '2' is not a number; write the log again",
        ),
        (
            '{"kind": "header", "format": "gradcheck-history", "version": 1, "every": null}',
            "the header line of the last run is damaged; write the log again with watch()",
        ),
    ],
)
def test_a_damaged_header_is_an_input_error(tmp_path: Path, header: str, message: str) -> None:
    model = tanh_mlp()
    written = tmp_path / "written.jsonl"
    with watch(model, every=1, log=written) as w:
        train(model, w, 1)
    _header, record = written.read_text().splitlines()
    assert run_cli(["history", written], cwd=tmp_path).returncode == 0  # the record line alone is readable
    path = tmp_path / "grads.jsonl"
    path.write_text(header + "\n" + record + "\n")  # a valid record after the damaged header
    assert_one_line_error(run_cli(["history", path], cwd=tmp_path), message)


def test_a_log_without_records_is_not_a_passing_gate(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    with watch(tanh_mlp(), every=5, log=path):
        pass  # the job died before its first recorded step
    proc = run_cli(["history", path], cwd=tmp_path)
    assert proc.returncode == 2 and "holds no recorded step yet" in proc.stderr


@pytest.mark.parametrize(("bad_steps", "flagged"), [({2}, False), ({2, 3, 4}, True)])
def test_a_grad_scaler_that_keeps_skipping_is_a_problem(bad_steps: set[int], flagged: bool) -> None:
    model = tanh_mlp()
    x, y = regression_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(), watch(model, every=1, scaler=scaler) as w:
        warnings.simplefilter("ignore", GradientWarning)
        for step in range(6):
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            extra = (out * 0).abs().sqrt().sum() if step in bad_steps else 0.0  # finite loss, NaN gradient
            scaler.scale(loss + extra).backward()
            w.step(loss)
            scaler.step(optimizer)  # skips the steps whose gradients are NaN, and lowers the scale
            scaler.update()
            optimizer.zero_grad()
    first = w.records[2]
    assert not first.problems and any(f.code == "GC003" and f.severity.value == "info" for f in first.findings)
    assert (Problem.NON_FINITE in w.onsets) is flagged, "one skipped step is the scaler at work; three are not"
    if flagged:
        assert w.onsets[Problem.NON_FINITE] == 4


def test_a_log_written_by_two_processes_says_so(tmp_path: Path) -> None:
    log = tmp_path / "grads.jsonl"
    model = tanh_mlp()
    with watch(model, every=1, log=log) as w:
        train(model, w, 3)
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], lines[1], lines[2], lines[1], lines[2], lines[3]]) + "\n")  # interleaved
    report = history_report(log)
    assert any("several processes may have written this run" in note for note in report.notes)


def test_a_compiled_model_is_not_called_torchscript() -> None:
    x, y = regression_data()
    model = torch.compile(tanh_mlp(), backend="aot_eager")
    with watch(model, every=1) as w:
        nn.functional.mse_loss(model(x), y).backward()
        assessment = w.step()
    assert assessment is not None
    gc006 = next(f for f in assessment.findings if f.code == "GC006")
    assert "torch.compile" in gc006.message and "TorchScript" not in gc006.message
