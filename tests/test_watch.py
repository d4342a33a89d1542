"""watch(): gradients recorded inside real training loops, hooks only on recorded steps, and on_problem."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from gradcheck_cli import watch
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe import readout
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.report.report import Problem
from gradcheck_cli.training.history import history_report
from gradcheck_cli.training.log import read_history
from gradcheck_cli.training.monitor import GradientProblemError, GradientWarning, Watch
from watch_support import hook_count, regression_data, single_record, tanh_mlp, train

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


def test_a_watched_step_reads_what_inspect_reads_of_the_same_pass() -> None:
    """One readout, one set of types: the same forward and backward, recorded by watch() and by inspect's
    probe, give the same layers to the last bit (watch adds each layer's output maximum). watch takes every
    parameter gradient's maximum in its hook (the loop may clip or zero the gradient before ``w.step()``), as
    the probe does with its half-precision forecast (``precision=True``); without it the probe leaves the
    maxima of finite gradients unread, and only that differs."""
    x, y = regression_data()
    model = tanh_mlp()

    def step(w: Watch) -> None:
        nn.functional.mse_loss(model(x), y).backward()
        w.step()

    watched = single_record(model, step)
    model.zero_grad(set_to_none=True)
    probed = probe(model, Batch(args=(x,), target=y), precision=True)
    assert probed.loss.kind == "mse"
    assert watched.measure.call_order == probed.call_order
    assert [dataclasses.replace(m, output_max=None) for m in watched.layers] == list(probed.layers)
    plain = probe(model, Batch(args=(x,), target=y))
    assert all(m.grad is not None and m.grad.max_abs is None and m.grad.finite for m in plain.layers)
    unread = [dataclasses.replace(m, grad=dataclasses.replace(m.grad, max_abs=None)) for m in probed.layers if m.grad]
    assert unread == list(plain.layers)
    assert all(m.output_max is not None and math.isfinite(m.output_max) for m in watched.layers)


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
    full = single_record(model, whole)
    model.zero_grad(set_to_none=True)
    split = single_record(model, halves)
    assert split.micro_batches == 2 and full.micro_batches == 1
    assert split.measure.call_order == full.measure.call_order
    for a, b in zip(full.layers, split.layers, strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad.l2 == pytest.approx(a.grad.l2, rel=1e-4)
        # ‖∂L/∂h‖ over the whole batch = √(Σ over micro-batches of their squared norms)
        assert b.calls[0] is not None and a.calls[0] is not None
        assert b.calls[0].l2 == pytest.approx(a.calls[0].l2, rel=1e-4)


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
    reference = single_record(model, plain)
    model.zero_grad(set_to_none=True)
    measured = single_record(model, scaled, scaler=scaler)
    assert measured.scale == 2.0**12
    for a, b in zip(reference.layers, measured.layers, strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad.l2 == pytest.approx(a.grad.l2, rel=1e-5)
        assert b.calls[0] is not None and a.calls[0] is not None
        assert b.calls[0].l2 == pytest.approx(a.calls[0].l2, rel=1e-5)


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
    reference = single_record(model, plain)
    model.zero_grad(set_to_none=True)
    measured = single_record(model, clipped)
    assert measured.total_norm == pytest.approx(reference.total_norm, rel=1e-5)
    assert measured.total_norm > 1e-3


@pytest.mark.parametrize("after_backward", ["clip_grad_value_", "zero_", "nan_to_num_", "zero_grad"])
def test_what_the_loop_does_to_the_gradient_before_step_cannot_change_its_finiteness(after_backward: str) -> None:
    """An Inf element is non-finite and a 1e25 one is not, whatever the loop does to ``.grad`` between backward and
    ``w.step()`` (clip, zero, repair, drop it): watch reads each gradient, its maximum included, as backward
    leaves it."""

    def with_element(value: float) -> object:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[0, 0] = value
            return grad

        return hook

    def loop_step(model: nn.Sequential) -> None:
        if after_backward == "clip_grad_value_":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        elif after_backward == "zero_grad":
            model.zero_grad(set_to_none=True)
        else:
            for p in model.parameters():
                getattr(p.grad, after_backward)()

    verdicts = []
    for value in (math.inf, 1e25):  # 1e25 squared overflows float32: the norm reads inf, every element is finite
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
        model[0].weight.register_hook(with_element(value))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with watch(model, every=1) as w:
                loss = model(torch.randn(8, 4)).pow(2).mean()
                loss.backward()
                loop_step(model)
                verdicts.append(w.step(loss.detach()).problems)
    assert verdicts == [(Problem.NON_FINITE,), ()]


def test_compiled_model_records_parameter_gradients_and_says_what_it_cannot_see() -> None:
    x, y = regression_data()
    eager = tanh_mlp()
    compiled = torch.compile(tanh_mlp(), backend="aot_eager")

    def step_of(model: nn.Module):  # type: ignore[no-untyped-def]
        def run(w: Watch) -> None:
            nn.functional.mse_loss(model(x), y).backward()
            w.step()

        return run

    reference = single_record(eager, step_of(eager))
    with watch(compiled, every=1) as probe_watch:
        assert any("torch.compile" in note for note in probe_watch.notes)
    measured = single_record(compiled, step_of(compiled))
    assert not measured.measure.activation_hooks and measured.measure.call_order == ()
    assert [la.name for la in measured.layers] == [la.name for la in reference.layers], "no _orig_mod. prefix"
    for a, b in zip(reference.layers, measured.layers, strict=True):
        assert a.grad is not None and b.grad is not None
        assert b.grad.l2 == pytest.approx(a.grad.l2, rel=1e-4)


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
        log = single_record(model, run)
    cell = next(la for la in log.layers if la.name == "cell")
    assert len(cell.calls) == 30
    assert cell.calls[0] is not None and cell.calls[-1] is not None
    assert cell.calls[0].l2 < cell.calls[-1].l2, "the gradient shrinks going back in time"


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
