"""The first non-finite locator: where NaN/Inf first appears, forward and backward, on real models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradcheck_cli.errors import BatchError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import EXAMPLES, mlp
from gradcheck_cli.probe.nonfinite import locate_non_finite
from gradcheck_cli.probe.nonfinite_checks import non_finite_flag
from gradcheck_cli.report.sections import NonFiniteOrigin, TensorSummary

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def _hook_count(model: nn.Module) -> int:
    """Module hooks on ``model``, and global module hooks (the locator uses those)."""
    from torch.nn.modules import module as torch_module

    global_hooks = len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks)
    return global_hooks + sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._forward_hooks_with_kwargs)
        + len(m._forward_pre_hooks_with_kwargs)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _finite(summary: TensorSummary) -> bool:
    return summary.nan == 0 and summary.inf == 0


def _classification(model: nn.Module, features: int, batch: int = 8) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(args=(torch.randn(batch, features, generator=g),), target=torch.randint(0, 10, (batch,), generator=g))


class ExpBlowUp(nn.Module):
    """exp(1000·x): overflows to Inf for any activation above ~0.09."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x * 1000)


class Block(nn.Module):
    """A container whose own forward overflows after a child that is finite."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.fc(x) * 1000)


class SqrtAbs(nn.Module):
    """√|x|: finite forward, but the gradient at an exact 0 is Inf (and 0·Inf = NaN through |x|)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x.abs())


class _Amplify(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * 1e30 * 1e30  # overflows float32


class Amplify(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Amplify.apply(x)


class InplaceOverflow(nn.Module):
    """Multiplies its input in place until it overflows: its input must be judged before it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(1e30).mul_(1e30)


# --- forward origin


def test_nan_weight_in_layer_7_of_a_12_layer_mlp_names_that_linear_and_its_weight() -> None:
    torch.manual_seed(0)
    model = mlp(12, 32, nn.Tanh, None)
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    name, layer = linears[6]  # the 7th Linear
    with torch.no_grad():
        layer.weight[3, 5] = math.nan
    origin = locate_non_finite(model, _classification(model, 32))

    assert origin.forward_module == name
    assert origin.forward_type == "Linear"
    assert origin.non_finite_parameters == (f"{name}.weight",)
    assert len(origin.forward_inputs) == 1 and _finite(origin.forward_inputs[0])
    assert origin.forward_inputs[0].shape == (8, 32)
    out = origin.forward_output
    assert out is not None and out.shape == (8, 32) and out.nan == 8  # one output unit, every sample
    assert out.inf == 0 and out.finite_abs_mean is not None and out.finite_abs_mean > 0
    # the loss of NaN logits sends NaN back: the last Linear's output gradient is the first to fire
    assert origin.backward_module == linears[-1][0]
    assert origin.backward_grad is not None and origin.backward_grad.nan > 0


def test_the_nan_weight_example() -> None:
    model, batch = EXAMPLES["nan-weight"].build(0)
    origin = locate_non_finite(model, batch)
    assert origin.forward_module == "2"
    assert origin.forward_type == "Linear"
    assert origin.non_finite_parameters == ("2.weight",)
    assert all(_finite(s) for s in origin.forward_inputs)


def test_exp_overflow_in_a_custom_module_mid_network() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), ExpBlowUp(), nn.Linear(16, 10))
    origin = locate_non_finite(model, _classification(model, 16))
    assert origin.forward_module == "3"
    assert origin.forward_type == "ExpBlowUp"
    assert origin.non_finite_parameters == ()
    assert _finite(origin.forward_inputs[0])
    assert origin.forward_output is not None and origin.forward_output.inf > 0
    assert origin.forward_output.finite_min is not None and origin.forward_output.finite_min >= 0


def test_a_container_is_named_when_its_own_forward_overflows_after_a_finite_child() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), Block(), nn.Linear(16, 10))
    origin = locate_non_finite(model, _classification(model, 16))
    assert origin.forward_module == "2"
    assert origin.forward_type == "Block"


def test_an_in_place_module_is_judged_on_its_input_before_it_overwrites_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), InplaceOverflow(), nn.Linear(16, 10))
    origin = locate_non_finite(model, _classification(model, 16))
    assert origin.forward_module == "3"
    assert _finite(origin.forward_inputs[0])
    assert origin.forward_inputs[0].finite_abs_mean is not None and origin.forward_inputs[0].finite_abs_mean < 10
    assert origin.forward_output is not None and origin.forward_output.inf > 0


def test_nan_in_the_batch_itself() -> None:
    torch.manual_seed(0)
    model = mlp(4, 16, nn.ReLU, None)
    batch = _classification(model, 16)
    batch.args[0][1, 2] = math.nan
    origin = locate_non_finite(model, batch)
    assert origin.forward_module is None
    assert origin.forward_output is None
    assert len(origin.forward_inputs) == 1
    assert origin.forward_inputs[0].nan == 1 and origin.forward_inputs[0].shape == (8, 16)


def test_nan_in_a_float_target_is_the_batch_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    target = torch.zeros(5, 3)
    target[0, 0] = math.inf
    origin = locate_non_finite(model, Batch(args=(torch.randn(5, 4),), target=target))
    assert origin.forward_module is None
    assert [s.inf for s in origin.forward_inputs] == [0, 1]


class FunctionalLog(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.log(self.fc1(x)))  # log of negative pre-activations: NaN from a functional op


def test_nan_from_a_functional_op_in_the_models_forward_names_no_module_and_has_no_summary() -> None:
    torch.manual_seed(0)
    origin = locate_non_finite(FunctionalLog(), Batch(args=(torch.randn(6, 8),)))
    assert origin.forward_module is None
    assert origin.forward_inputs == () and origin.forward_output is None
    assert origin.non_finite_parameters == ()
    # the projection loss's gradient does not depend on the output, and log's on finite inputs is finite:
    # only fc2's weight gradient (its input is NaN) is non-finite, and no output gradient is
    assert origin.backward_module is None


def test_a_healthy_model_has_no_origin() -> None:
    torch.manual_seed(0)
    model = mlp(4, 16, nn.ReLU, None)
    assert locate_non_finite(model, _classification(model, 16)) == NonFiniteOrigin(forward_module=None)


# --- backward origin


def test_sqrt_of_zero_is_located_in_backward_order_while_the_forward_is_clean() -> None:
    torch.manual_seed(0)
    feeding = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), feeding, SqrtAbs(), nn.Linear(8, 3))
    with torch.no_grad():
        feeding.weight[0].zero_()  # unit 0 is exactly 0 for every sample: d√|x|/dx is Inf there
        feeding.bias[0] = 0.0
    origin = locate_non_finite(model, Batch(args=(torch.randn(5, 4),), target=torch.randint(0, 3, (5,))))
    assert origin.forward_module is None and origin.forward_inputs == ()
    assert origin.backward_module == "2"  # the Linear whose output gets the non-finite gradient
    assert origin.backward_type == "Linear"
    grad = origin.backward_grad
    assert grad is not None and grad.shape == (5, 8)
    assert grad.nan + grad.inf == 5  # column 0, every sample; the other units' gradients are finite
    assert grad.finite_abs_mean is not None and grad.finite_abs_mean > 0


def test_a_custom_backward_that_overflows_is_located() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), Amplify(), nn.Linear(8, 3))
    origin = locate_non_finite(model, Batch(args=(torch.randn(5, 4),)))
    assert origin.forward_module is None
    assert origin.backward_module == "2"
    assert origin.backward_grad is not None and origin.backward_grad.inf > 0


# --- architectures


def test_inplace_relu_cnn_with_a_nan_conv_bias() -> None:
    torch.manual_seed(0)
    broken = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        broken,
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():
        assert broken.bias is not None
        broken.bias[2] = math.nan
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    origin = locate_non_finite(model, Batch(args=(x,), target=torch.tensor([1, 2])))
    assert origin.forward_module == "4"
    assert origin.non_finite_parameters == ("4.bias",)
    assert _finite(origin.forward_inputs[0])
    out = origin.forward_output
    assert out is not None and out.nan == 2 * 6 * 6  # channel 2, everywhere
    # summarised before the in-place ReLU that follows overwrote it: negative values are still there
    assert out.finite_min is not None and out.finite_min < 0
    assert _hook_count(model) == 0


def test_rnn_cell_loop_names_the_step_whose_hidden_state_overflows() -> None:
    torch.manual_seed(0)
    cell = nn.RNNCell(4, 8, nonlinearity="relu")
    with torch.no_grad():
        cell.weight_hh.copy_(torch.eye(8) * 1e6)
        cell.bias_hh.fill_(1.0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.zeros(x.shape[1], 8)
            for step in x:
                h = self.cell(step, h)
            return self.head(h)

    x = torch.randn(12, 3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the step where the hidden state first overflows, by hand
        h = torch.zeros(3, 8)
        overflowed = []
        for step in x:
            h = cell(step, h)
            overflowed.append(not bool(torch.isfinite(h).all()))
    first = overflowed.index(True)
    assert 0 < first < 11

    origin = locate_non_finite(Loop(), Batch(args=(x,)))
    assert origin.forward_module == f"cell (call {first + 1} of 12)"
    assert origin.forward_type == "RNNCell"
    assert origin.non_finite_parameters == ()
    assert all(_finite(s) for s in origin.forward_inputs) and len(origin.forward_inputs) == 2  # x_t and h
    assert origin.forward_output is not None and origin.forward_output.inf > 0


def test_transformer_with_an_additive_minus_inf_mask_is_not_blamed_on_the_mask() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    with torch.no_grad():
        model.layers[1].self_attn.in_proj_weight[0, 0] = math.nan
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    assert torch.isneginf(mask).any()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    origin = locate_non_finite(model, Batch(args=(x,), kwargs={"mask": mask}))
    assert origin.forward_module == "layers.1.self_attn"
    assert origin.non_finite_parameters == ("layers.1.self_attn.in_proj_weight",)


def test_gpt2_with_a_nan_in_one_blocks_attention_weight() -> None:
    from zoo import hf_gpt2

    model, batch = hf_gpt2(labels=True)
    weight = model.get_parameter("transformer.h.2.attn.c_attn.weight")
    with torch.no_grad():
        weight[0, 0] = math.nan
    origin = locate_non_finite(model, batch)
    assert origin.forward_module == "transformer.h.2.attn.c_attn"
    assert origin.non_finite_parameters == ("transformer.h.2.attn.c_attn.weight",)
    assert all(_finite(s) for s in origin.forward_inputs)
    assert origin.backward_module is not None
    assert _hook_count(model) == 0


def test_fp16_overflow_under_autocast_is_located_like_the_probe_saw_it() -> None:
    torch.manual_seed(0)
    big = nn.Linear(8, 8)
    with torch.no_grad():
        big.weight.mul_(1e5)  # weights fit float16 (|w| < 35 400), outputs ~1e5 overflow it (max 65 504)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), big, nn.Tanh(), nn.Linear(8, 3))
    batch = Batch(args=(torch.randn(4, 8),))
    assert locate_non_finite(model, batch).forward_module is None
    origin = locate_non_finite(model, batch, autocast="fp16")
    assert origin.forward_module == "2"
    assert origin.forward_output is not None and origin.forward_output.inf > 0
    assert origin.non_finite_parameters == ()


# --- hygiene


def test_no_hook_left_and_state_restored_after_success() -> None:
    torch.manual_seed(0)
    first, norm, last = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
    model = nn.Sequential(first, norm, nn.Dropout(0.5), last)
    with torch.no_grad():
        last.weight[0, 0] = math.nan
    model.eval()
    first.weight.requires_grad_(False)
    sentinel = torch.full_like(last.weight, 7.0)
    last.weight.grad = sentinel
    assert norm.running_mean is not None
    running = norm.running_mean.clone()
    batch = Batch(args=(torch.randn(6, 4),))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    origin = locate_non_finite(model, batch, train=True)

    assert torch.equal(torch.rand(3), expected)  # global RNG untouched
    assert origin.forward_module == "3"
    assert _hook_count(model) == 0
    assert not model.training and not norm.training
    assert first.weight.requires_grad is False
    assert last.weight.grad is sentinel and first.weight.grad is None
    assert torch.equal(norm.running_mean, running)
    assert norm.num_batches_tracked is not None and int(norm.num_batches_tracked) == 0


class InplaceExpBlowUp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(1000).exp_()


def test_dropout_is_seeded_like_the_probe_and_the_replay_sees_the_same_mask() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.5), InplaceExpBlowUp(), nn.Linear(32, 2))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))

    def overflows(seed: int) -> tuple[int, int]:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            model.train()
            dropped = model[:2](x)
            return int((dropped == 0).sum()), int(torch.isinf(model[2](dropped)).sum())

    assert overflows(3) != overflows(4)  # the mask matters
    for seed in (3, 4):
        # the culprit overwrites its input in place, so its summaries come from the replay
        origin = locate_non_finite(model, Batch(args=(x,)), seed=seed)
        assert origin.forward_module == "2"
        _, infs = overflows(seed)
        assert origin.forward_output is not None and origin.forward_output.inf == infs
        assert _finite(origin.forward_inputs[0]) and origin.forward_inputs[0].finite_min is not None


def test_the_replay_gives_the_same_summaries_as_the_tensors_kept_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradcheck_cli.probe import nonfinite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), ExpBlowUp(), nn.Linear(16, 10))
    batch = _classification(model, 16)
    kept = locate_non_finite(model, batch)
    monkeypatch.setattr(nonfinite, "untouched", lambda kept: False)
    replayed = locate_non_finite(model, batch)
    assert kept.forward_module == "3" and replayed == kept


class KeepsItsOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.fc(x)
        return self.last * 2


def test_no_gradient_hook_is_left_on_a_tensor_the_model_keeps() -> None:
    model = KeepsItsOutput()
    with torch.no_grad():
        model.fc.bias[0] = math.nan
    origin = locate_non_finite(model, Batch(args=(torch.randn(2, 4),)))
    assert origin.forward_module == "fc"
    assert model.last is not None and not model.last._backward_hooks


def test_no_hook_left_after_a_forward_that_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    with pytest.raises(BatchError, match="forward pass raised"):
        locate_non_finite(model, Batch(args=(torch.randn(2, 5),)))
    assert _hook_count(model) == 0


def test_a_fully_frozen_model_is_refused_unless_unfrozen() -> None:
    layer = nn.Linear(4, 3)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    model.requires_grad_(False)
    with pytest.raises(BatchError, match="no trainable parameters"):
        locate_non_finite(model, Batch(args=(torch.randn(2, 4),)))
    origin = locate_non_finite(model, Batch(args=(torch.randn(2, 4),)), unfreeze=True)
    assert origin.forward_module == "0" and layer.weight.requires_grad is False


def test_torchscript_takes_no_module_hooks_but_the_batch_is_still_checked() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 3)))
    x = torch.randn(2, 4)
    x[0, 0] = math.inf
    origin = locate_non_finite(scripted, Batch(args=(x,)))
    assert origin.forward_module is None and origin.forward_inputs[0].inf == 1


def test_a_single_leaf_model_is_its_own_culprit() -> None:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.bias[1] = math.inf
    origin = locate_non_finite(model, Batch(args=(torch.randn(2, 4),)))
    assert origin.forward_module == ""
    assert origin.non_finite_parameters == ("bias",)


def test_flag_counts_nan_and_inf_but_not_an_additive_mask() -> None:
    assert not bool(non_finite_flag(torch.tensor([0.0, -math.inf, 0.0])))
    assert bool(non_finite_flag(torch.tensor([1.0, -math.inf])))
    assert bool(non_finite_flag(torch.tensor([0.0, math.nan])))
    assert bool(non_finite_flag(torch.tensor([math.inf, 0.0])))
    assert not bool(non_finite_flag(torch.tensor([1.0, 2.0])))
    assert not bool(non_finite_flag(torch.zeros(0)))
