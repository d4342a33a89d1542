"""The optimisation probe: real short training runs on copies, the verdict rule, findings and the chart."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from torch import nn

import gradcheck_cli
from gradcheck_cli.advise.optimise import (
    CONVERGED_LOSS,
    GROWTH_LIMIT,
    MAX_STEPS,
    UNSTABLE_OPTIMISATION,
    classify,
    optimisation_findings,
    trace_optimisation,
)
from gradcheck_cli.errors import BatchError, GradcheckError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import mlp
from gradcheck_cli.render.steps_chart import render_steps_chart
from gradcheck_cli.render.view import MAX_ROWS, shown_rows
from gradcheck_cli.report.report import Problem, Severity
from gradcheck_cli.report.sections import OptimisationTrace, StepRecord

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def _regression_batch(samples: int = 64, features: int = 16) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, features, generator=g)
    return Batch(args=(x,), target=torch.randn(samples, 1, generator=g))


def _classification_batch(samples: int = 64, features: int = 16) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, features, generator=g)
    return Batch(args=(x,), target=torch.randint(0, 10, (samples,), generator=g))


def _tanh_regressor() -> nn.Module:
    """4 Linear layers of width 32 with tanh, one output, PyTorch's default init."""
    torch.manual_seed(0)
    return mlp(4, 32, nn.Tanh, None, in_features=16, out_features=1)


def _loss_jump(trace: OptimisationTrace, factor: float = 10.0) -> int:
    """The first step whose loss is more than ``factor`` × step 0's (or not finite)."""
    loss0 = trace.steps[0].loss
    return next(r.step for r in trace.steps if not math.isfinite(r.loss) or r.loss > factor * loss0)


# ------------------------------------------------------------------------------------------ real runs


def test_healthy_mlp_with_a_reasonable_lr_stays_stable_and_records_every_step():
    trace = trace_optimisation(_tanh_regressor(), _regression_batch(), steps=20, lr=0.05)
    assert trace.verdict == "stable"
    assert trace.onset_step is None
    assert [r.step for r in trace.steps] == list(range(21))  # steps 0…N: the state after step N is probed too
    assert trace.layers == ("0", "2", "4", "6")
    assert all(len(r.layer_grad_norms) == 4 for r in trace.steps)
    assert trace.steps[-1].loss < trace.steps[0].loss  # it trains
    first = trace.steps[0]
    assert first.grad_norm == pytest.approx(math.sqrt(sum(n * n for n in first.layer_grad_norms)))
    assert first.attenuation is not None and first.gain is not None
    assert optimisation_findings(trace) == ()


def test_healthy_cnn_with_adam_stays_stable():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(8 * 8 * 8, 10),
    )
    g = torch.Generator().manual_seed(2)
    batch = Batch(args=(torch.randn(16, 3, 8, 8, generator=g),), target=torch.randint(0, 10, (16,), generator=g))
    trace = trace_optimisation(model, batch, steps=20, lr=1e-3, optimizer="adam")
    assert trace.verdict == "stable", [(r.loss, r.grad_norm, r.attenuation) for r in trace.steps]
    assert trace.optimizer == "adam"
    assert len(trace.steps) == 21
    assert trace.steps[-1].loss < trace.steps[0].loss


def test_huge_lr_explodes_from_the_step_where_the_loss_jumps():
    """SGD at lr 2 on the same tanh regressor: the gradient norm grows ≥ 2× at every step from step 1 (6.3×,
    4.5×, 73×...), where the divergence begins; the loss follows and jumps 10× at step 3."""
    trace = trace_optimisation(_tanh_regressor(), _regression_batch(), steps=8, lr=2.0)
    assert trace.verdict == "exploding"
    onset = trace.onset_step
    assert onset == 1 and _loss_jump(trace) == 3
    g0 = trace.steps[0].grad_norm
    norms = [r.grad_norm for r in trace.steps]
    assert all(norms[k + 1] >= 2 * norms[k] for k in range(5)) and norms[5] > GROWTH_LIMIT * g0
    assert trace.steps[1].loss > trace.steps[0].loss  # the loss already rises at the onset
    assert all(math.isfinite(r.loss) for r in trace.steps)
    (finding,) = optimisation_findings(trace)
    assert finding.code == UNSTABLE_OPTIMISATION.code == "GC015"
    assert finding.name == "unstable-optimisation"
    assert finding.severity is Severity.ERROR
    assert finding.problem is Problem.EXPLODING
    assert finding.evidence["onset_step"] == onset
    assert finding.evidence["criterion"] == "geometric_growth"
    assert finding.evidence["optimizer"] == "sgd" and finding.evidence["lr"] == 2.0
    assert finding.evidence["grad_norm_step0"] == g0
    assert finding.evidence["grad_norm_onset"] == trace.steps[onset].grad_norm
    assert finding.layer in trace.layers
    assert f"the layer whose gradient changed most: {finding.layer}" in finding.message
    assert "SGD at lr 2" in finding.message and "from step 1" in finding.message


def test_huge_lr_run_on_goes_non_finite_and_stops_there():
    trace = trace_optimisation(_tanh_regressor(), _regression_batch(), steps=30, lr=2.0)
    assert trace.verdict == "non_finite"
    last = trace.steps[-1]
    assert trace.onset_step == last.step < 30  # stopped early: no record after the first NaN/Inf
    assert not math.isfinite(last.loss) or not math.isfinite(last.grad_norm)
    assert all(math.isfinite(r.loss) and math.isfinite(r.grad_norm) for r in trace.steps[:-1])
    (finding,) = optimisation_findings(trace)
    assert finding.problem is Problem.NON_FINITE and finding.severity is Severity.ERROR
    assert finding.evidence["left_band_step"] == 1  # where it started exploding, as in the 8-step run
    assert finding.evidence["left_band_verdict"] == "exploding"
    assert f"after {last.step} step(s)" in finding.message


def test_large_adam_step_kills_the_relus_and_the_gradient_collapses():
    """Adam at lr 0.3 on a 4-layer ReLU classifier: one large step leaves every hidden ReLU dead.

    From step 4 the three hidden layers get exactly zero gradient, the path attenuation is 0 and
    the loss stays at chance level (ln 10 ≈ 2.3): the gradient collapsed, the model did not converge.
    """
    torch.manual_seed(0)
    model = mlp(4, 32, nn.ReLU, None, in_features=16, out_features=10)
    trace = trace_optimisation(model, _classification_batch(), steps=15, lr=0.3, optimizer="adam")
    assert trace.verdict == "collapsing"
    assert trace.onset_step == 4
    at = trace.steps[4]
    assert at.attenuation == 0
    assert at.layer_grad_norms[:3] == (0.0, 0.0, 0.0)
    assert all(r.attenuation == 0 for r in trace.steps[4:])
    assert all(r.loss > 2.0 for r in trace.steps[4:])  # not converged: chance level
    assert trace.steps[0].attenuation is not None and trace.steps[0].attenuation > 1e-2  # healthy at step 0
    (finding,) = optimisation_findings(trace)
    assert finding.problem is Problem.VANISHING and finding.severity is Severity.ERROR
    assert finding.evidence["criterion"] == "attenuation_collapse"
    assert finding.layer == "4"  # the last hidden layer whose gradient fell to exactly 0
    assert "fell to exactly 0" in finding.message


def test_converging_regression_is_not_collapsing():
    """Adam fits a small tanh net to 16 targets: the gradient falls below 1e-3 of step 0's with the loss."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    trace = trace_optimisation(model, Batch(args=(x,), target=y), steps=150, lr=0.01, optimizer="adam")
    g0, loss0 = trace.steps[0].grad_norm, trace.steps[0].loss
    assert min(r.grad_norm for r in trace.steps) < 1e-3 * g0  # the gradient did collapse…
    assert trace.steps[-1].loss < CONVERGED_LOSS * loss0 * 1e-2  # …because the loss went to ~0
    assert trace.verdict == "stable"
    assert optimisation_findings(trace) == ()
    # the same gradients with a loss that stayed put are a collapse: the loss is what tells them apart
    stuck = [dataclasses.replace(r, loss=loss0) for r in trace.steps]
    verdict, onset, criterion = classify(stuck)
    assert (verdict, criterion) == ("collapsing", "grad_norm_collapse")
    assert onset is not None and trace.steps[onset].grad_norm < 1e-3 * g0


def test_random_projection_loss_runs_without_a_target():
    torch.manual_seed(0)
    model = mlp(3, 16, nn.ReLU, None, in_features=8, out_features=4)
    trace = trace_optimisation(model, Batch(args=(torch.randn(8, 8),)), steps=3, lr=0.01)
    assert len(trace.steps) == 4
    assert trace.verdict == "stable"


# ------------------------------------------------------------------------------------------ the user's model


class _Stateful(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))))))


def test_the_users_model_is_unchanged_bit_for_bit():
    torch.manual_seed(0)
    model = _Stateful().eval()
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    nn.functional.cross_entropy(model(x), y).backward()  # the user has gradients lying around
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before_modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()

    trace = trace_optimisation(model, Batch(args=(x,), target=y), steps=5, lr=0.5, optimizer="adam")

    assert len(trace.steps) == 6
    assert trace.steps[-1].loss != trace.steps[0].loss  # the copy did train
    state = model.state_dict()
    assert state.keys() == before_state.keys()
    for key, value in before_state.items():
        assert torch.equal(state[key], value), key  # weights and BatchNorm running stats, bit for bit
    for name, p in model.named_parameters():
        grad = before_grads[name]
        assert (p.grad is None) == (grad is None), name
        assert grad is None or torch.equal(p.grad, grad), name
        assert p.requires_grad == before_flags[name], name
    assert {n: m.training for n, m in model.named_modules()} == before_modes
    assert torch.equal(torch.get_rng_state(), rng)


def test_frozen_layers_are_measured_but_not_stepped_and_a_frozen_model_needs_unfreeze(monkeypatch):
    import gradcheck_cli.advise.optimise as optimise

    copies: list[nn.Module] = []
    real_copy = optimise._copy
    monkeypatch.setattr(optimise, "_copy", lambda model: copies.append(real_copy(model)) or copies[-1])
    torch.manual_seed(0)
    model = _Stateful()
    x, y = torch.randn(12, 8), torch.randint(0, 3, (12,))
    trace = trace_optimisation(model, Batch(args=(x,), target=y), steps=3, lr=0.1)
    frozen = trace.layers.index("frozen")
    assert all(r.layer_grad_norms[frozen] > 0 for r in trace.steps)  # the flow through it is measured
    (trained,) = copies
    assert torch.equal(trained.frozen.weight, model.frozen.weight)  # …and it is never updated
    assert not torch.equal(trained.fc1.weight, model.fc1.weight)

    model.requires_grad_(False)
    with pytest.raises(BatchError, match="--unfreeze"):
        trace_optimisation(model, Batch(args=(x,), target=y), steps=2, lr=0.1)
    trace = trace_optimisation(model, Batch(args=(x,), target=y), steps=2, lr=0.1, unfreeze=True)
    assert not torch.equal(copies[-1].frozen.weight, model.frozen.weight)  # --unfreeze trains everything
    assert not any(p.requires_grad for p in model.parameters())


def test_a_model_that_cannot_be_copied_is_an_input_error():
    class Locked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.lock = threading.Lock()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    with pytest.raises(GradcheckError, match=r"copy\.deepcopy.*--steps") as info:
        trace_optimisation(Locked(), Batch(args=(torch.randn(3, 4),)), steps=2, lr=0.1)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "--steps"),
        ({"steps": -3}, "--steps"),
        ({"steps": MAX_STEPS + 1}, "--steps"),
        ({"steps": 2.5}, "--steps"),
        ({"steps": True}, "--steps"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": -0.1}, "--lr"),
        ({"lr": math.nan}, "--lr"),
        ({"lr": math.inf}, "--lr"),
        ({"optimizer": "rmsprop"}, "--optimizer"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(kwargs, message):
    args = {"steps": 2, "lr": 0.1, **kwargs}
    model = nn.Linear(4, 2)
    with pytest.raises(GradcheckError, match=message) as info:
        trace_optimisation(model, Batch(args=(torch.randn(3, 4),)), **args)
    assert "\n" not in str(info.value)


def test_torchscript_model_is_copied_by_save_and_load_and_trained():
    torch.manual_seed(0)
    model = torch.jit.script(mlp(3, 16, nn.ReLU, None, in_features=8, out_features=4))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batch = Batch(args=(torch.randn(8, 8),), target=torch.randint(0, 4, (8,)))
    trace = trace_optimisation(model, batch, steps=3, lr=0.1)
    assert trace.verdict == "stable" and len(trace.steps) == 4
    assert trace.steps[-1].loss < trace.steps[0].loss
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_optimizer_names_are_case_insensitive():
    trace = trace_optimisation(nn.Linear(4, 2), Batch(args=(torch.randn(3, 4),)), steps=1, lr=0.1, optimizer="AdamW")
    assert trace.optimizer == "adamw"
    assert len(trace.steps) == 2


# ------------------------------------------------------------------------------------------ the rule


def _records(norms, losses=None, attenuations=None):
    losses = losses or [1.0] * len(norms)
    attenuations = attenuations or [0.5] * len(norms)
    return [
        StepRecord(step=i, loss=loss, grad_norm=g, attenuation=a, gain=None, layer_grad_norms=(g,))
        for i, (g, loss, a) in enumerate(zip(norms, losses, attenuations, strict=True))
    ]


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        ([1, 2, 0.5, 3, 0.3, 2, 1, 4, 0.5, 1], ("stable", None)),  # noise within 1e-3…1e3
        ([1, 1, 1e4, 1, 1, 1, 1], ("stable", None)),  # a 1-step spike
        ([1, 1, 1e4, 1e5, 1, 1, 1], ("stable", None)),  # a 2-step spike
        ([1, 1, 1e4, 1e5, 1e4, 1, 1], ("exploding", 2)),  # 3 steps outside: sustained
        ([1, 1, 1, 1, 1, 5e3], ("exploding", 5)),  # the run ended outside the band
        ([1, 1, 1e-4, 1, 1, 1], ("stable", None)),  # a 1-step dip
        ([1, 1, 1, 1e-4, 1e-5, 1e-4, 1e-4], ("collapsing", 3)),
        ([1, 1, 2, 5, 12, 30, 70, 150], ("exploding", 2)),  # still doubling every step when the run ended
        ([1, 1, 2, 5, 12, 30, 70, 60], ("stable", None)),  # the growth stopped within the band
    ],
)
def test_the_verdict_rule_on_synthetic_runs(norms, expected):
    verdict, onset, _ = classify(_records([float(n) for n in norms]))
    assert (verdict, onset) == expected


def test_attenuation_crossing_counts_only_after_an_order_of_magnitude():
    # 2e-3 → 5e-4 crosses the 1e-3 vanishing threshold but is a 4× drift: not a collapse
    drift = _records([1.0] * 6, attenuations=[2e-3, 2e-3, 5e-4, 5e-4, 5e-4, 5e-4])
    assert classify(drift)[0] == "stable"
    fall = _records([1.0] * 6, attenuations=[2e-2, 2e-2, 5e-4, 5e-4, 5e-4, 5e-4])
    assert classify(fall) == ("collapsing", 2, "attenuation_crossed")
    rise = _records([1.0] * 5, attenuations=[600.0, 600.0, 5e3, 5e3, 5e3])
    assert classify(rise)[0] == "stable"
    rise = _records([1.0] * 5, attenuations=[20.0, 20.0, 5e3, 5e3, 5e3])
    assert classify(rise) == ("exploding", 2, "attenuation_crossed")


def test_a_collapse_with_the_loss_fitted_is_convergence_and_a_nan_is_non_finite():
    converged = _records([1, 1e-2, 1e-4, 1e-5, 1e-6], losses=[1, 1e-2, 1e-4, 1e-6, 1e-8])
    assert classify(converged)[0] == "stable"
    nan = _records([1.0, 2.0, math.nan], losses=[1.0, 3.0, math.nan])
    assert classify(nan) == ("non_finite", 2, "non_finite")


def test_explosion_then_collapse_reports_the_first_and_mentions_the_second():
    records = _records([1, 1e4, 1e4, 1e4, 1, 1, 1], attenuations=[0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0])
    verdict, onset, _ = classify(records)
    trace = OptimisationTrace("sgd", 1.0, ("fc",), tuple(records), verdict, onset)
    assert (verdict, onset) == ("exploding", 1)
    (finding,) = optimisation_findings(trace)
    assert finding.evidence["then"] == {"verdict": "collapsing", "onset_step": 4}
    assert "then collapsing from step 4" in finding.message


# ------------------------------------------------------------------------------------------ the chart


def test_chart_of_a_real_run_shows_every_step_the_onset_and_the_verdict():
    trace = trace_optimisation(_tanh_regressor(), _regression_batch(), steps=8, lr=2.0)
    text = render_steps_chart(trace)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert lines[0].startswith("optimisation probe: SGD, lr 2, on a copy of the model: 9 records, steps 0…8")
    header = next(line for line in lines if line.lstrip().startswith("step"))
    for column in ("loss", "‖∂L/∂θ‖", "÷step 0", "gain", "log ±6"):
        assert column in header
    rows = [line for line in lines if line[:4].strip().isdigit()]
    assert [int(line[:4]) for line in rows] == list(range(9))
    onset_row = rows[trace.onset_step or 0]
    assert "◀ onset" in onset_row and "█" in onset_row
    assert f"{trace.steps[1].grad_norm:.2e}" in onset_row
    assert rows[0].count("█") == 0 and "|" in rows[0]  # step 0 sits on the 1× mark
    assert rows[-1].rstrip().endswith(">")  # beyond 1e6× runs off the scale
    assert lines[-1] == "✗ exploding from step 1"


def test_chart_thins_long_runs_keeping_first_onset_and_last():
    records = _records([1.0] * 300 + [1e5] * 201)
    trace = OptimisationTrace("adam", 1e-3, ("fc",), tuple(records), "exploding", 300)
    assert shown_rows(trace.steps, 300)[:1] == [0]
    kept = shown_rows(trace.steps, 300)
    assert len(kept) == MAX_ROWS and {0, 300, 500} <= set(kept) and kept == sorted(set(kept))
    text = render_steps_chart(trace)
    lines = text.splitlines()
    rows = [line for line in lines if line[:4].strip().isdigit()]
    assert len(rows) == MAX_ROWS
    assert "showing 20 of 501" in text
    assert any(line.lstrip().startswith("300 ") and "◀ onset" in line for line in rows)
    assert rows[-1].lstrip().startswith("500 ")
    assert all(len(line) <= 100 for line in lines)


def test_chart_of_a_stable_and_a_non_finite_run_without_colour():
    stable = OptimisationTrace("sgd", 0.1, ("fc",), tuple(_records([1.0, 0.5, 1e-7])), "stable", None)
    text = render_steps_chart(stable)
    assert "\x1b[" not in text
    assert "<" in text.splitlines()[-2]  # 1e-7× is off the scale to the left
    assert text.splitlines()[-1].startswith("✓ stable")
    broken = OptimisationTrace(
        "sgd", 10.0, ("fc",), tuple(_records([1.0, 30.0, math.nan], losses=[1.0, 5.0, math.nan])), "non_finite", 2
    )
    text = render_steps_chart(broken)
    assert "nan" in text.splitlines()[-2] and "◀ onset" in text.splitlines()[-2]
    assert text.splitlines()[-1] == "✗ NaN/Inf at step 2 (the run stopped there)"


# ----------------------------------------------------------------- issue 18: the loss the steps minimise


def _trained_mlp() -> nn.Module:
    """A ReLU MLP trained for 300 SGD steps on a smooth regression (loss falls ~1000×): a healthy trained model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model


def test_healthy_trained_model_without_target_is_stable() -> None:
    """No target: the steps minimise a bounded surrogate, not the random projection (which has no minimum and
    took this model's gradient from 11 to NaN within 8 steps at lr 0.1)."""
    model = _trained_mlp()
    batch = Batch(args=(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)),))
    trace = trace_optimisation(model, batch, steps=8, lr=0.1)
    assert trace.verdict == "stable", [r.grad_norm for r in trace.steps]
    report = gradcheck_cli.check(model, batch, steps=8, lr=0.1, verify=False)
    assert "GC015" not in {f.code for f in report.findings}
    # the report says which loss the steps minimised (JSON key optimisation.loss, text "loss minimised: ...")
    assert report.optimisation is not None and report.optimisation.loss.startswith("bounded surrogate: mean squared")
    assert report.to_dict()["optimisation"]["loss"] == report.optimisation.loss
    assert "loss minimised: bounded surrogate" in str(report)
    with_target = trace_optimisation(model, Batch(args=batch.args, target=torch.randn(16, 1)), steps=1, lr=0.1)
    assert with_target.loss == "the loss of the batch's target"


def test_bounded_surrogate_is_named_and_seeded() -> None:
    from gradcheck_cli.advise.surrogate import SURROGATE, bounded_batch
    from gradcheck_cli.settings import ProbeSettings

    model = nn.Sequential(nn.Linear(8, 4))
    batch = Batch(args=(torch.randn(6, 8),))
    first, words = bounded_batch(model, batch, ProbeSettings(seed=3))
    again, _ = bounded_batch(model, batch, ProbeSettings(seed=3))
    assert SURROGATE in words and "mean squared error" in words
    assert first.target is not None and again.target is not None and torch.equal(first.target, again.target)
    assert first.target.shape == (6, 4)
    with_target = Batch(args=batch.args, target=torch.randn(6, 4))
    assert bounded_batch(model, with_target, ProbeSettings())[0] is with_target


@pytest.mark.parametrize(("example", "lr"), [("deep-linear", 1e-3), ("relu-kaiming", 0.5)])
def test_unstable_model_without_target_still_flagged(example: str, lr: float) -> None:
    """A sick model (deep-linear: orthogonal ×1.2 over 50 layers) or too high a step still blows up on the
    bounded surrogate: GC015."""
    from gradcheck_cli.load.examples import get_example

    model, batch = get_example(example).build(0)
    trace = trace_optimisation(model, Batch(args=batch.args), steps=8, lr=lr)
    assert trace.verdict in ("non_finite", "exploding")
    assert optimisation_findings(trace)[0].code == "GC015"
