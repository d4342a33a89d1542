"""Verified recommendations: each fix applied to a copy of a real sick model and re-probed."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import threading
import weakref
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.advise import fixes, verify
from gradcheck_cli.advise.fixes import NotApplicable
from gradcheck_cli.advise.structure_fixes import Residual
from gradcheck_cli.advise.verify import order_by_effect, verify_recommendations
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import EXAMPLES
from gradcheck_cli.report.report import Recommendation
from gradcheck_cli.report.sections import Outcome, Verification
from zoo import fused_rnn, torch_lstm

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def check(model: nn.Module, batch: Batch):
    """The report alone: these tests call verify_recommendations themselves."""
    if "verify" in inspect.signature(api.check).parameters:
        return api.check(model, batch, verify=False)
    return api.check(model, batch)


def _verified(model: nn.Module, batch: Batch):
    report = check(model, batch)
    verifications = verify_recommendations(model, batch, report)
    assert [v.id for v in verifications] == [r.id for r in report.recommendations]
    return report, {v.id: v for v in verifications}, verifications


@pytest.fixture(scope="module")
def deep_sigmoid():
    return _verified(*EXAMPLES["deep-sigmoid"].build(0))


@pytest.fixture(scope="module")
def relu_xavier():
    return _verified(*EXAMPLES["relu-xavier"].build(0))


@pytest.fixture(scope="module")
def deep_linear():
    return _verified(*EXAMPLES["deep-linear"].build(0))


def _ratio(layers) -> float:
    profile = next(layer.time_grad_norms for layer in layers if layer.time_grad_norms)
    return profile[0] / profile[-1]


# --- the examples: which fix really fixes what ---------------------------------------------------


def test_deep_sigmoid_is_fixed_by_relu_with_kaiming_by_batch_norm_and_by_residual_not_by_xavier(deep_sigmoid):
    report, by_id, verifications = deep_sigmoid
    for fix in ("activation_change", "batch_norm", "residual"):
        v = by_id[fix]
        assert v.verified and v.fixed, (fix, v)
        assert v.after is not None and v.after.status == "healthy" and v.after.problems == ()
        assert v.effect is not None and v.effect > 30  # from an underflow (0) into the band
        assert v.seconds > 0
    assert "kaiming_normal_" in by_id["activation_change"].applied and "ReLU" in by_id["activation_change"].applied
    assert "BatchNorm1d" in by_id["batch_norm"].applied
    xavier = by_id["xavier_init"]
    assert xavier.verified and not xavier.fixed  # sigmoid's derivative ≤ 0.25 still compounds
    assert xavier.after is not None and "vanishing" in xavier.after.problems
    before = by_id["batch_norm"].before
    assert before == Outcome("unhealthy", ("vanishing",), report.path.attenuation, report.path.gain, True)

    recs, ordered = order_by_effect(report.recommendations, verifications)
    top = next(v for v in ordered if v.verified)
    assert top.fixed
    assert [r.id for r in recs] == [v.id for v in ordered]


def test_a_bare_sigmoid_to_relu_swap_without_reinitialising_still_vanishes():
    """Why activation_change re-initialises: the sigmoid-sized default init is too small for ReLU."""
    model, batch = EXAMPLES["deep-sigmoid"].build(0)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Sigmoid):
            setattr(model, name, nn.ReLU())
    report = check(model, batch)
    assert "vanishing" in [p.value for p in report.problems]


def test_relu_xavier_is_fixed_by_kaiming_init_by_more_than_four_orders(relu_xavier):
    _, by_id, _ = relu_xavier
    kaiming = by_id["kaiming_init"]
    assert kaiming.verified and kaiming.fixed
    assert kaiming.after is not None and kaiming.after.status == "healthy"
    assert kaiming.effect is not None and kaiming.effect > 4
    assert kaiming.after.attenuation is not None and 0.1 < kaiming.after.attenuation < 10
    assert "relu for 49" in kaiming.applied
    assert by_id["residual"].fixed  # the pre-norm shortcut
    # batch norm at init makes a deep ReLU net explode (Yang et al. 2019): verified, honestly not fixed
    bn = by_id["batch_norm"]
    assert bn.verified and not bn.fixed and bn.after is not None and "exploding" in bn.after.problems


def test_deep_linear_is_fixed_by_orthogonal_init_while_clipping_only_bounds_the_step(deep_linear):
    report, by_id, verifications = deep_linear
    clip = by_id["gradient_clipping"]
    assert clip.verified and not clip.fixed and clip.effect == 0
    assert "bounded" in clip.applied and "unchanged" in clip.applied
    assert clip.after is not None and clip.after.attenuation == pytest.approx(report.path.attenuation)
    ortho = by_id["orthogonal_init"]
    assert ortho.verified and ortho.fixed and ortho.effect is not None and ortho.effect > 0.5
    # orthogonal hidden layers (gain 1) keep the norm; the 128→10 head keeps its 1.2× orthonormal rows: 1.2 exactly
    assert ortho.after is not None and ortho.after.attenuation == pytest.approx(1.2, rel=1e-3)
    assert by_id["batch_norm"].fixed  # hidden layers of a linear stack get a norm too
    assert not by_id["lower_lr"].verified and "--steps" in by_id["lower_lr"].reason
    _, ordered = order_by_effect(report.recommendations, verifications)
    assert ordered[0].fixed and [v.id for v in ordered[-2:]] == ["lower_lr", "gradient_clipping"]
    assert [v.id for v in ordered if v.verified and not v.fixed] == ["gradient_clipping"]


def test_clipping_states_the_total_norm_before_and_after():
    model, batch = EXAMPLES["rnn-exploding"].build(0)
    report = check(model, batch)
    rec = next(r for r in report.recommendations if r.id == "gradient_clipping")
    (v,) = verify_recommendations(model, batch, dataclasses.replace(report, recommendations=(rec,)))
    assert v.verified and not v.fixed and v.effect == 0
    # the numbers come from this run (the chaotic RNN's norm differs between CPUs): the total before clipping is
    # the report's layers' gradient norms combined, after clipping it is the snippet's max_norm
    match = re.search(
        r"clip_grad_norm_\(max_norm=([\d.e+-]+)\): the total gradient norm went from (\S+) to (\S+),", v.applied
    )
    assert match, v.applied
    max_norm, before, after = (float(x) for x in match.groups())
    assert f"max_norm={max_norm:g}" in rec.snippet
    total = math.sqrt(sum(layer.grad_norm**2 for layer in report.layers if layer.grad_norm is not None))
    assert total > 1e6 * max_norm  # exploding: clipping has real work to do
    assert before == pytest.approx(total, rel=1e-2)
    assert after == pytest.approx(max_norm, rel=1e-2)


@pytest.mark.parametrize("name", ["rnn-vanishing", "rnn-exploding"])
def test_orthogonal_recurrent_weights_move_the_tanh_rnn_towards_the_band(name):
    model, batch = EXAMPLES[name].build(0)
    _, by_id, _ = _verified(model, batch)
    v = by_id["orthogonal_init"]
    assert v.verified and v.effect is not None and v.effect > 5
    assert "weight_hh" in v.applied
    assert v.after is not None and "exploding" not in v.after.problems
    # tanh' < 1 still shrinks it over 200 steps with singular values 1: improved, not fixed
    assert not v.fixed and v.after.attenuation is not None and v.after.attenuation > 1e-9
    assert not by_id["lstm_gru"].verified and "LSTM/GRU" in by_id["lstm_gru"].reason


def test_orthogonal_init_makes_each_gate_block_orthogonal():
    lstm = nn.LSTM(4, 8)
    fixes.orthogonal_init(lstm)
    for block in lstm.weight_hh_l0.detach().chunk(4, 0):
        torch.testing.assert_close(block @ block.T, torch.eye(8), atol=1e-5, rtol=0)


def test_forget_gate_bias_raises_the_lstm_through_time_ratio():
    model, batch = torch_lstm()
    report, by_id, _ = _verified(model, batch)
    v = by_id["forget_gate_bias"]
    assert v.verified and v.effect is not None and v.effect > 1
    assert not v.fixed  # still a vanishing-through-time warning, only less so

    fixed = copy.deepcopy(model)
    fixes.forget_gate_bias(fixed)
    assert _ratio(check(fixed, batch).layers) > 10 * _ratio(report.layers)
    h = 64
    for layer in (0, 1):
        bias_ih = getattr(fixed.lstm, f"bias_ih_l{layer}").detach()
        bias_hh = getattr(fixed.lstm, f"bias_hh_l{layer}").detach()
        assert torch.all(bias_ih[h : 2 * h] == 1) and torch.all(bias_hh[h : 2 * h] == 0)
        untouched = getattr(model.lstm, f"bias_ih_l{layer}").detach()
        assert torch.equal(bias_ih[:h], untouched[:h]) and torch.equal(bias_ih[2 * h :], untouched[2 * h :])


def test_gru_gets_its_update_gate_biased_towards_keeping_the_state():
    model, batch = fused_rnn("GRU", steps=50)
    fixed = copy.deepcopy(model)
    words = fixes.forget_gate_bias(fixed)
    assert "update gate" in words
    assert torch.all(fixed.rnn.bias_ih_l0.detach()[256:512] == 1)
    assert _ratio(check(fixed, batch).layers) > _ratio(check(model, batch).layers)
    with pytest.raises(NotApplicable, match="LSTM/GRU"):
        fixes.forget_gate_bias(nn.RNN(4, 4))


def test_non_finite_weights_cannot_be_clipped_finite():
    model, batch = EXAMPLES["nan-weight"].build(0)
    _, by_id, _ = _verified(model, batch)
    clip = by_id["gradient_clipping"]
    assert clip.verified and not clip.fixed and "cannot make finite" in clip.applied
    assert clip.before is not None and not clip.before.finite


def test_re_initialising_a_nan_weight_counts_as_a_large_effect_and_a_raw_batch_is_accepted():
    model, batch = EXAMPLES["nan-weight"].build(0)
    report = check(model, batch)
    kaiming = Recommendation("kaiming_init", "t", "w", "s")
    raw = (*batch.args, batch.target)  # what a batch file holds, as check() accepts it
    (v,) = verify_recommendations(model, raw, dataclasses.replace(report, recommendations=(kaiming,)))
    assert v.verified and v.fixed and v.after is not None and v.after.finite
    assert v.effect is not None and v.effect > 90  # non-finite counts as 100 orders outside the band
    assert math.isnan(float(model[2].weight.detach()[0, 0]))  # the user's NaN is still there


# --- where a fix does not apply ------------------------------------------------------------------


class SigmoidStack(nn.Module):
    """A deep sigmoid net in a ModuleList: no nn.Sequential anywhere."""

    def __init__(self, depth: int = 30, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = nn.Sigmoid()
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


def test_without_nn_sequential_norms_and_shortcuts_are_not_applicable_but_the_swap_is():
    torch.manual_seed(0)
    model = SigmoidStack()
    batch = Batch(args=(torch.randn(32, 16),), target=torch.randint(0, 3, (32,)))
    _, by_id, _ = _verified(model, batch)
    for fix in ("batch_norm", "residual"):
        assert not by_id[fix].verified and "nn.Sequential" in by_id[fix].reason
        assert by_id[fix].after is None
    swap = by_id["activation_change"]
    assert swap.verified and swap.fixed  # one shared Sigmoid module swapped, the 30 layers re-initialised
    assert "30 Linear/Conv layers" in swap.applied


def test_a_fix_that_breaks_the_forward_comes_back_unverified_with_the_reason():
    model, _ = EXAMPLES["deep-sigmoid"].build(0)
    batch = Batch(args=(torch.randn(1, 16),), target=torch.tensor([3]))  # BatchNorm cannot train on one sample
    report = check(model, batch)
    by_id = {v.id: v for v in verify_recommendations(model, batch, report)}
    assert not by_id["batch_norm"].verified
    assert "could not be probed" in by_id["batch_norm"].reason and "channel" in by_id["batch_norm"].reason
    assert by_id["activation_change"].verified


def test_unknown_recommendations_are_unverified_with_a_reason(deep_sigmoid):
    report, _, _ = deep_sigmoid
    model, batch = EXAMPLES["deep-sigmoid"].build(0)
    odd = Recommendation("rewrite_everything", "t", "w", "s")
    (v,) = verify_recommendations(model, batch, dataclasses.replace(report, recommendations=(odd,)))
    assert not v.verified and "no in-memory fix" in v.reason and v.seconds == 0


# --- the user's model ----------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    return (
        [
            (n, p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone(), p.grad is None)
            for n, p in model.named_parameters()
        ],
        [(n, b.clone()) for n, b in model.named_buffers()],
        [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        bits = (t.detach().reshape(-1).contiguous().view(torch.uint8) for t in (a, b))
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(*bits)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_the_users_model_is_left_bit_identical_and_the_global_rng_alone():
    model, batch = EXAMPLES["deep-sigmoid"].build(0)
    model[5].eval()
    model[0].weight.requires_grad_(False)
    model[2].weight.grad = torch.randn_like(model[2].weight)
    model[4].bias.grad = torch.full_like(model[4].bias, math.nan)
    report = check(model, batch)
    before = _snapshot(model)
    grad_object = model[2].weight.grad
    rng = torch.get_rng_state()
    verifications = verify_recommendations(model, batch, report)
    assert any(v.fixed for v in verifications)
    assert _same(_snapshot(model), before)
    assert model[2].weight.grad is grad_object
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_each_copy_is_freed_before_the_next_is_made(monkeypatch, deep_sigmoid):
    report, _, _ = deep_sigmoid
    model, batch = EXAMPLES["deep-sigmoid"].build(0)
    copies: list[weakref.ref[nn.Module]] = []
    original = verify._copy_model

    def tracked(m: nn.Module) -> nn.Module:
        assert all(ref() is None for ref in copies), "the previous copy is still alive"
        made = original(m)
        copies.append(weakref.ref(made))
        return made

    monkeypatch.setattr(verify, "_copy_model", tracked)
    verify_recommendations(model, batch, report)
    needs_copy = [r for r in report.recommendations if r.id in fixes.FIXES or r.id == "gradient_clipping"]
    assert len(copies) == len(needs_copy) >= 4
    assert all(ref() is None for ref in copies)


class Uncopyable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = EXAMPLES["relu-xavier"].build(0)[0]
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.body(x)


def test_a_model_that_cannot_be_deep_copied_leaves_every_recommendation_unverified():
    model = Uncopyable()
    _, batch = EXAMPLES["relu-xavier"].build(0)
    report = check(model, batch)
    assert report.recommendations
    verifications = verify_recommendations(model, batch, report)
    assert len(verifications) == len(report.recommendations)
    for v in verifications:
        assert not v.verified and "cannot be deep-copied" in v.reason and "lock" in v.reason


# --- the fixes on their own ----------------------------------------------------------------------


def test_kaiming_uses_the_leaky_relu_slope_and_xavier_the_activation_gain():
    torch.manual_seed(0)
    leaky = nn.Sequential(nn.Linear(512, 512), nn.LeakyReLU(0.2), nn.Linear(512, 10))
    words = fixes.kaiming_init(leaky)
    assert "slope 0.2" in words and "linear for 1" in words
    expected = math.sqrt(2 / (1 + 0.2**2)) / math.sqrt(512)
    assert float(leaky[0].weight.detach().std()) == pytest.approx(expected, rel=0.02)
    assert torch.all(leaky[0].bias == 0)

    tanh = nn.Sequential(nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10))
    fixes.xavier_init(tanh)
    assert float(tanh[0].weight.detach().std()) == pytest.approx(5 / 3 * math.sqrt(2 / 1024), rel=0.02)
    with pytest.raises(NotApplicable):
        fixes.kaiming_init(nn.LSTM(4, 4))


def test_norms_go_after_hidden_conv_and_linear_layers_keeping_names_and_the_parent_object():
    inner = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten())
    )
    model = nn.Sequential(inner, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    words = fixes.batch_norm(model)
    assert model[0] is inner and list(inner._modules) == ["conv", "conv_batchnorm2d", "act", "pool", "flat"]
    assert isinstance(model[2], nn.BatchNorm1d) and isinstance(model[3], nn.Tanh) and len(model) == 5
    assert "BatchNorm2d" in words and "BatchNorm1d" in words
    assert model(torch.randn(4, 3, 6, 6)).shape == (4, 2)

    ln = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 2))
    assert "GroupNorm" in fixes.layer_norm(ln) and isinstance(ln[1], nn.GroupNorm)
    with pytest.raises(NotApplicable, match="hidden"):
        fixes.batch_norm(nn.Sequential(nn.Linear(4, 4)))


def test_residual_wraps_shape_preserving_blocks_only():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # changes channels: stays
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),  # keeps the shape: wrapped with its norm and activation
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # halves the size: stays
        nn.Flatten(),
    )
    words = fixes.residual(model)
    assert "1 shape-preserving" in words
    assert isinstance(model[2], Residual) and len(model[2].body) == 3
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 8 * 16)
    with pytest.raises(NotApplicable, match="shape"):
        fixes.residual(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


def test_activation_change_is_not_applicable_to_functional_activations_or_rnn_internals():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.fc(x))

    with pytest.raises(NotApplicable, match="functions"):
        fixes.activation_change(Functional())
    with pytest.raises(NotApplicable, match="part of the cell"):
        fixes.activation_change(nn.RNN(4, 4))


# --- ordering ------------------------------------------------------------------------------------


def test_order_by_effect_puts_fixed_first_then_helpful_then_unverified_then_unhelpful():
    def ver(rec_id: str, verified: bool, effect: float | None = None, fixed: bool = False, att: float = 1.0):
        after = Outcome("healthy" if fixed else "unhealthy", (), att, None) if verified else None
        return Verification(rec_id, verified, after=after, effect=effect, fixed=fixed)

    vs = [
        ver("u1", False),
        ver("v_small", True, 0.5),
        ver("f_small", True, 2.0, True),
        ver("u2", False),
        ver("f_big_far", True, 40.0, True, att=30.0),
        ver("v_none", True, None),
        ver("f_big_near", True, 40.0, True, att=0.8),
        ver("v_worse", True, -3.0),
        ver("v_big", True, 3.0),
    ]
    recs = [Recommendation(v.id, "", "", "") for v in vs]
    ordered_recs, ordered = order_by_effect(recs, vs)
    expected = ["f_big_near", "f_big_far", "f_small", "v_big", "v_small", "u1", "u2", "v_worse", "v_none"]
    assert [v.id for v in ordered] == expected
    assert [r.id for r in ordered_recs] == expected
    with pytest.raises(ValueError):
        order_by_effect(recs[:2], vs[:1])
    with pytest.raises(ValueError):
        order_by_effect(recs[:2], vs[1:3])
