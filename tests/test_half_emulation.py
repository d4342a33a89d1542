"""``--autocast fp16`` on a CPU: CUDA's fp16 autocast emulated with float32 kernels.

The CPU's own fp16 kernels are 7-11× slower than float32 (a 22M-parameter CNN: 157 s instead of ~15 s for the
whole run), so gradcheck emulates fp16 autocast. These tests compare the emulation with the CPU's real
``torch.autocast("cpu", dtype=torch.float16)`` on models whose ops both treat alike (matmuls and convolutions in
fp16; ReLU, pooling, dropout, batch norm following their fp16 inputs): the share of every layer's gradient that
fp16 flushes to zero, the values, and overflow to inf agree.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
from torch import nn

from gradcheck_cli.probe.half_emulation import HalfEmulation, is_half


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def real() -> AbstractContextManager[object]:
    return torch.autocast("cpu", dtype=torch.float16)


def gradients(
    build: Callable[[], nn.Module], x: torch.Tensor, context: Callable[[], AbstractContextManager[object]], scale: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Each child's output gradient, each parameter's gradient, and the output, after a loss scaled by ``scale``
    (small: a share of the gradients falls below fp16's range)."""
    model, seen = build(), {}
    for name, child in model.named_children():

        def keep(module: nn.Module, inputs: object, output: torch.Tensor, name: str = name) -> None:
            output.register_hook(lambda g: seen.__setitem__(name, g.detach().float().clone()))

        child.register_forward_hook(keep)
    torch.manual_seed(1)
    with context():
        y = model(x)
    (y.float().pow(2).mean() * scale).backward()
    return seen, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, y.detach().float()


@pytest.mark.parametrize(
    ("build", "shape", "scale"), [(cnn, (16, 3, 32, 32), 3e-3), (mlp, (32, 64), 3e-3), (mlp, (32, 64), 1e-5)]
)
def test_the_emulation_loses_the_same_gradient_to_zero_as_real_fp16_autocast(
    build: Callable[[], nn.Module], shape: tuple[int, ...], scale: float
) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    real_acts, real_params, real_out = gradients(build, x, real, scale)
    emu_acts, emu_params, emu_out = gradients(build, x, HalfEmulation, scale)
    fp32_acts, _, _ = gradients(build, x, torch.enable_grad, scale)
    assert real_acts.keys() == emu_acts.keys() and real_params.keys() == emu_params.keys()
    flushed = 0
    for name in real_acts:
        real_zero = (real_acts[name] == 0).float().mean().item()
        assert (emu_acts[name] == 0).float().mean().item() == pytest.approx(real_zero, abs=0.01), name
        flushed += real_zero > (fp32_acts[name] == 0).float().mean().item() + 0.01
    for name in real_params:
        real_zero = (real_params[name] == 0).float().mean().item()
        assert (emu_params[name] == 0).float().mean().item() == pytest.approx(real_zero, abs=0.01), name
    assert flushed >= 3, "the scale must make fp16 flush gradients that float32 keeps, or the test shows nothing"
    # values: the emulation is nearer real fp16 than float32 is
    assert (emu_out - real_out).abs().max() <= (gradients(build, x, torch.enable_grad, scale)[2] - real_out).abs().max()


def test_an_fp16_overflow_is_inf_as_in_real_fp16() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    counts = []
    for context in (real, HalfEmulation, torch.enable_grad):
        model = mlp()
        with torch.no_grad():
            model[4].weight.mul_(5e5)  # outputs beyond fp16's 65504 for some samples
        with context():
            counts.append(int(torch.isinf(model(x).float()).sum()))
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == 0


def test_casts_and_explicit_dtypes_leave_float32_and_the_mode_is_gone_afterwards() -> None:
    layer = nn.Linear(4, 4)
    with HalfEmulation():
        h = layer(torch.randn(3, 4))
        relu = torch.relu(h)
        assert is_half(h) and is_half(relu)  # an fp16 op's output, and an op on fp16 inputs
        assert not is_half(h.float())  # an explicit cast to float32
        assert not is_half(h.new_zeros((), dtype=torch.float32))
        assert is_half(h.new_zeros(()))  # new_zeros of an fp16 tensor is fp16
        assert not is_half(h + torch.randn(3, 4))  # promoted by a float32 tensor
        assert is_half(h * 2.0)  # a Python number does not promote
        assert not is_half(torch.softmax(h, -1))  # autocast's float32 list
    assert not torch.overrides._get_current_function_mode_stack()
    assert not is_half(layer(torch.randn(3, 4)))


def test_check_under_fp16_autocast_on_a_cpu_uses_the_emulation_and_says_so() -> None:
    from gradcheck_cli.api import check

    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    report = check(cnn(), (x,), autocast="fp16", verify=False)
    assert any("fp16 autocast emulated on the CPU" in note for note in report.notes), report.notes
    assert not torch.overrides._get_current_function_mode_stack()
