"""watch(): gradients recorded inside real training loops, hooks only on recorded steps, and the history."""

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
from gradcheck_cli.probe import readout
from gradcheck_cli.report.report import Problem
from gradcheck_cli.training import hooks as watch_hooks
from gradcheck_cli.training.history import history_report
from gradcheck_cli.training.log import read_history
from gradcheck_cli.training.monitor import GradientProblemError, GradientWarning, Watch


def tanh_mlp(depth: int = 4, width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def regression_data(seed: int = 0, n: int = 128, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    return x, x[:, :1].sin() + 0.5 * x[:, 1:2]


def train(
    model: nn.Module,
    w: Watch,
    steps: int,
    *,
    lr: float = 0.1,
    blow_up_at: int | None = None,
    factor: float = 300.0,
) -> list[float]:
    """A plain SGD loop with w.step(loss) between backward and the optimiser step; returns the losses."""
    x, y = regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        if step == blow_up_at:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        w.step(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def hook_count(model: nn.Module) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return modules + params


# ------------------------------------------------------------------ a healthy run and a diverging one


def test_healthy_run_stays_healthy(tmp_path: Path) -> None:
    model = tanh_mlp()
    log = tmp_path / "grads.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # any warning fails the test
        with watch(model, every=5, log=log) as w:
            losses = train(model, w, 60)
    assert losses[-1] < losses[0] / 2, "the run must really learn for this to be a healthy-run test"
    assert [a.step for a in w.records] == list(range(0, 60, 5))
    assert all(not a.problems for a in w.records)
    report = history_report(log)
    assert report.healthy and report.history is not None
    assert report.history.verdict == "healthy" and report.history.records == 12
    assert report.history.healthy_norm_median is not None and report.history.healthy_norm_median > 0
    assert not report.recommendations


def test_learning_rate_blow_up_is_caught_at_its_step(tmp_path: Path) -> None:
    model = tanh_mlp()
    log = tmp_path / "grads.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)
        with watch(model, every=1, log=log) as w:
            train(model, w, 40, blow_up_at=20)
    # the gradient of step 20 was computed before the larger step: step 21 is the first the new rate touched
    assert w.onsets[next(p for p in w.onsets if p.value == "exploding")] == 21
    report = history_report(log)
    assert report.history is not None
    onset = next(o for o in report.history.onsets if o.problem == "exploding")
    assert onset.step == 21 and onset.last_healthy_step == 20
    assert "GC016" in onset.codes
    clip = next(r for r in report.recommendations if r.id == "gradient_clipping")
    median = report.history.healthy_norm_median
    assert median is not None and report.history.clip_max_norm == pytest.approx(2 * median, rel=0.05)
    assert f"max_norm={report.history.clip_max_norm:g}" in clip.snippet
    assert [r.id for r in report.recommendations][:2] == ["gradient_clipping", "lower_lr"]


def test_first_non_finite_module_is_named_in_forward_order(tmp_path: Path) -> None:
    model = tanh_mlp(depth=4)
    log = tmp_path / "grads.jsonl"
    x, y = regression_data()
    with warnings.catch_warnings(), watch(model, every=1, log=log) as w:
        warnings.simplefilter("ignore", GradientWarning)
        for step in range(6):
            if step == 4:
                with torch.no_grad():
                    model[4].weight[0, 0] = math.inf  # the third Linear: its output is the first non-finite one
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.step(loss)
            model.zero_grad(set_to_none=True)
    bad = w.records[4]
    assert [p.value for p in bad.problems] == ["non_finite"]
    records = read_history(log).records
    assert records[4].first_non_finite == "4" and records[4].first_non_finite_stage == "forward"
    assert all(r.first_non_finite is None for r in records[:4])
    report = history_report(log)
    assert report.history is not None
    onset = report.history.onsets[0]
    assert (onset.problem, onset.step, onset.last_healthy_step, onset.layers[0]) == ("non_finite", 4, 3, "4")
    assert any("appeared first in 4 (its output)" in f.message for f in report.findings)


def test_nan_loss_between_records_is_dated_exactly(tmp_path: Path) -> None:
    model = tanh_mlp()
    log = tmp_path / "grads.jsonl"
    x, y = regression_data()
    with warnings.catch_warnings(), watch(model, every=10, log=log) as w:
        warnings.simplefilter("ignore", GradientWarning)
        for step in range(21):
            batch = x.clone()
            if step >= 13:
                batch[0, 0] = math.nan
            loss = nn.functional.mse_loss(model(batch), y)
            loss.backward()
            w.step(loss)
            model.zero_grad(set_to_none=True)
    assert [a.step for a in w.records] == [0, 10, 20]
    report = history_report(log)
    assert report.history is not None
    onset = next(o for o in report.history.onsets if o.problem == "non_finite")
    assert onset.step == 13 and onset.last_healthy_step == 10
    assert "GC017" in onset.codes
    dated = {o.problem: o.step for o in report.history.onsets}
    assert {p.value: s for p, s in w.onsets.items()} == dated, "the live onsets are dated like the history"


# ------------------------------------------------------------------ hooks only on recorded steps, one host read


def test_hooks_exist_only_for_recorded_steps_and_none_after(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tanh_mlp()
    before = hook_count(model)
    reads = []
    real = readout.to_host
    monkeypatch.setattr(readout, "to_host", lambda tensors: reads.append(len(tensors)) or real(tensors))
    x, y = regression_data()
    armed_at = []
    with watch(model, every=3) as w:
        for _ in range(10):
            armed_at.append(hook_count(model) > before)
            assert w.armed == armed_at[-1]
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.step(loss)
            model.zero_grad(set_to_none=True)
    assert armed_at == [step % 3 == 0 for step in range(10)]
    assert len(reads) == 4, "exactly one host read per recorded step (0, 3, 6, 9), none otherwise"
    assert hook_count(model) == before


def test_hooks_are_removed_when_the_loop_raises() -> None:
    model = tanh_mlp()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), watch(model, every=1):
        model(torch.randn(4, 32)).sum().backward()
        raise RuntimeError("boom")
    assert hook_count(model) == before


def test_an_evaluation_pass_between_records_does_not_enter_the_record() -> None:
    model = tanh_mlp()
    x, y = regression_data()
    with watch(model, every=1) as w:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        with torch.no_grad():
            model(x)  # a validation forward while armed
        assessment = w.step(loss)
    assert assessment is not None
    assert assessment.diagnosis.path.length == 5, "one call per Linear, the no_grad pass left out"


# ------------------------------------------------------------------ accumulation, GradScaler, torch.compile


def _single_record(model: nn.Module, run: callable, **kwargs: object) -> watch_hooks.StepLog:  # type: ignore[valid-type]
    captured: list[watch_hooks.StepLog] = []
    with watch(model, every=1, **kwargs) as w:  # type: ignore[arg-type]
        real = w._judge

        def keep(log: watch_hooks.StepLog):  # type: ignore[no-untyped-def]
            captured.append(log)
            return real(log)

        w._judge = keep  # type: ignore[method-assign]
        run(w)
    return captured[0]


def test_gradient_accumulation_equals_the_whole_batch() -> None:
    x, y = regression_data()

    def whole(w: Watch) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        w.step()

    def halves(w: Watch) -> None:
        for part in (slice(0, 64), slice(64, 128)):
            (nn.functional.mse_loss(model(x[part]), y[part]) / 2).backward()
        w.step()

    model = tanh_mlp()
    full = _single_record(model, whole)
    model.zero_grad(set_to_none=True)
    split = _single_record(model, halves)
    assert split.micro_batches == 2 and full.micro_batches == 1
    assert split.order == full.order
    for a, b in zip(full.layers, split.layers, strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad[0] == pytest.approx(a.grad[0], rel=1e-4)
        # ‖∂L/∂h‖ over the whole batch = √(Σ over micro-batches of their squared norms)
        assert b.calls[0] is not None and a.calls[0] is not None
        assert b.calls[0][0] == pytest.approx(a.calls[0][0], rel=1e-4)


def test_grad_scaler_norms_read_unscaled() -> None:
    x, y = regression_data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def plain(w: Watch) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        w.step()

    def scaled(w: Watch) -> None:
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        w.step()

    model = tanh_mlp()
    reference = _single_record(model, plain)
    model.zero_grad(set_to_none=True)
    measured = _single_record(model, scaled, scaler=scaler)
    assert measured.scale == 2.0**12
    for a, b in zip(reference.layers, measured.layers, strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad[0] == pytest.approx(a.grad[0], rel=1e-5)
        assert b.calls[0] is not None and a.calls[0] is not None
        assert b.calls[0][0] == pytest.approx(a.calls[0][0], rel=1e-5)


def test_clipping_before_step_does_not_hide_the_norm() -> None:
    x, y = regression_data()

    def clipped(w: Watch) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-6)
        w.step()

    def plain(w: Watch) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        w.step()

    model = tanh_mlp()
    reference = _single_record(model, plain)
    model.zero_grad(set_to_none=True)
    measured = _single_record(model, clipped)
    assert measured.total_norm == pytest.approx(reference.total_norm, rel=1e-5)
    assert measured.total_norm > 1e-3


def test_compiled_model_records_parameter_gradients_and_says_what_it_cannot_see() -> None:
    x, y = regression_data()
    eager = tanh_mlp()
    compiled = torch.compile(tanh_mlp(), backend="aot_eager")

    def step_of(model: nn.Module):  # type: ignore[no-untyped-def]
        def run(w: Watch) -> None:
            nn.functional.mse_loss(model(x), y).backward()
            w.step()

        return run

    reference = _single_record(eager, step_of(eager))
    with watch(compiled, every=1) as probe_watch:
        assert any("torch.compile" in note for note in probe_watch.notes)
    measured = _single_record(compiled, step_of(compiled))
    assert not measured.activation_hooks and measured.order == ()
    assert [la.name for la in measured.layers] == [la.name for la in reference.layers], "no _orig_mod. prefix"
    for a, b in zip(reference.layers, measured.layers, strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad[0] == pytest.approx(a.grad[0], rel=1e-4)


def test_rnn_cell_calls_are_recorded_in_order() -> None:
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.RNNCell(8, 16)
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[1], 16)
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
            return self.head(h)

    torch.manual_seed(0)
    model = Loop()
    x = torch.randn(30, 4, 8)

    def run(w: Watch) -> None:
        model(x).pow(2).mean().backward()
        w.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientWarning)  # 30 steps of a plain tanh cell do vanish
        log = _single_record(model, run)
    cell = next(la for la in log.layers if la.name == "cell")
    assert len(cell.calls) == 30
    assert cell.calls[0] is not None and cell.calls[-1] is not None
    assert cell.calls[0][0] < cell.calls[-1][0], "the gradient shrinks going back in time"


# ------------------------------------------------------------------ on_problem


def test_on_problem_raise_stops_at_the_onset() -> None:
    model = tanh_mlp()
    with pytest.raises(GradientProblemError) as caught, watch(model, every=1, on_problem="raise") as w:
        train(model, w, 40, blow_up_at=20)
    assert caught.value.assessment.step == 21
    assert "step 21" in str(caught.value)


def test_on_problem_stop_ends_the_block_cleanly() -> None:
    model = tanh_mlp()
    before = hook_count(model)
    steps_run = []
    with watch(model, every=1, on_problem="stop") as w:
        x, y = regression_data()
        optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
        for step in range(40):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.step(loss)
            steps_run.append(step)
            optimizer.step()
            optimizer.zero_grad()
    assert w.should_stop
    # it stopped at the first record with a problem: the step() of that record raised, so its step never ran on
    *earlier, onset = w.records
    assert onset.problems == (Problem.EXPLODING,) and w.onsets == {Problem.EXPLODING: onset.step}
    assert all(record.problems == () for record in earlier)
    assert steps_run == list(range(onset.step)) == [record.step for record in earlier]
    assert onset.step == 3  # lr 20 blows this model up within a few steps
    assert hook_count(model) == before


def test_on_problem_warn_warns_once_per_problem() -> None:
    model = tanh_mlp()
    with pytest.warns(GradientWarning) as caught, watch(model, every=1) as w:
        train(model, w, 40, blow_up_at=20)
    messages = [str(c.message) for c in caught if issubclass(c.category, GradientWarning)]
    assert len(messages) == len(set(w.onsets)), "one warning per new problem, not one per record"
    assert any("step 21" in m for m in messages)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"every": 0}, "every must be a positive int"), ({"on_problem": "panic"}, "on_problem must be one of")],
)
def test_bad_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        watch(tanh_mlp(), **kwargs)  # type: ignore[arg-type]


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
