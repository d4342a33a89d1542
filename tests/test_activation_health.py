"""Activation health: saturated sigmoid/tanh units, dead ReLUs and φ'(z), measured on the probe's pass."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradcheck_cli.diagnose.activation_health import (
    DEAD_SHARE,
    SATURATED_SHARE,
    activation_findings,
    activation_section,
)
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import get_example, mlp
from gradcheck_cli.probe.activations import SIGMOID_SATURATION, TANH_SATURATION, derivative
from gradcheck_cli.probe.measure import probe
from zoo import HEALTHY

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def section(model: nn.Module, batch: Batch):
    return activation_section(probe(model, batch).activations)


def test_saturation_bounds_are_where_the_derivative_falls_below_one_percent():
    z = torch.tensor([SIGMOID_SATURATION], dtype=torch.float64)
    assert derivative("Sigmoid", z, nn.Sigmoid()).item() == pytest.approx(0.01 * 0.25, rel=1e-9)
    z = torch.tensor([TANH_SATURATION], dtype=torch.float64)
    assert derivative("Tanh", z, nn.Tanh()).item() == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("kind", ["Sigmoid", "Tanh", "GELU", "SiLU", "ELU", "LeakyReLU"])
def test_derivatives_match_autograd(kind):
    module = getattr(nn, kind)()
    z = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(module(z).sum(), z)
    mask = z.detach().abs() > 1e-9  # the kinks of ReLU-like functions
    assert torch.allclose(derivative(kind, z.detach(), module)[mask], grad[mask], atol=1e-9)


def test_saturated_sigmoid_stack_is_explained_by_saturation():
    model, batch = get_example("saturated-sigmoid").build(0)
    layers = section(model, batch)
    assert len(layers) == 49 and all(a.type == "Sigmoid" for a in layers)
    assert all(a.flag == "saturated" for a in layers)
    assert min(a.saturated or 0.0 for a in layers) > 0.5
    (finding,) = activation_findings(layers)
    assert finding.code == "GC011" and finding.layer == "1"
    assert finding.evidence["saturated_share"] > SATURATED_SHARE


def test_default_sigmoid_stack_is_not_saturated_but_its_derivative_is_a_quarter():
    """The classic vanishing sigmoid stack does not saturate: σ'(z) ≈ 0.24 everywhere is the cause."""
    model, batch = get_example("deep-sigmoid").build(0)
    layers = section(model, batch)
    assert len(layers) == 49  # one per Sigmoid between the 50 Linear layers
    assert all(a.saturated == 0.0 and a.flag is None for a in layers)
    assert all(0.2 < a.derivative_rms <= 0.25 for a in layers)
    assert activation_findings(layers) == ()


def test_large_negative_bias_kills_relus_and_the_first_dead_layer_is_named():
    model, batch = get_example("dead-relu").build(0)
    layers = section(model, batch)
    by_name = {a.layer: a for a in layers}
    assert by_name["5"].dead is not None and by_name["5"].dead < 0.1  # before the broken layer
    assert by_name["7"].dead == 1.0 and by_name["7"].flag == "dead"
    findings = activation_findings(layers)
    assert [f.code for f in findings] == ["GC012"]
    assert findings[0].layer == "7" and findings[0].evidence["dead_share"] == 1.0


def test_dead_share_needs_enough_samples_per_unit():
    torch.manual_seed(0)
    model = mlp(3, 32, nn.ReLU, None)
    layers = section(model, Batch(args=(torch.randn(2, 32),)))
    assert [a.layer for a in layers] == ["1", "3"]  # the two ReLUs between the three Linear layers
    assert all(a.dead is None and a.flag is None for a in layers)  # 2 samples: half the units ≤ 0 by chance


def test_inplace_relu_is_measured_before_it_overwrites_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    (relu,) = section(model, Batch(args=(torch.randn(4, 3, 16, 16),)))
    assert relu.dead == 1.0 and relu.samples_per_unit == 4 * 14 * 14  # per channel, over batch and positions
    assert relu.derivative_rms == 0.0


def test_a_residual_relu_after_an_identity_shortcut_judges_channels():
    """Hugging Face's ResNet adds an ``nn.Identity`` shortcut before the block's ReLU: the units are still the
    BatchNorm's channels, not the last (width) dimension."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.shortcut, self.act = (
                nn.Conv2d(4, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.Identity(),
                nn.ReLU(),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.norm(self.conv(x)) + self.shortcut(x))

    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.norm.bias.copy_(torch.tensor([-100.0, -100.0, -100.0, 0.0]))  # three channels dead for any input
    (relu,) = section(model, Batch(args=(torch.randn(8, 4, 6, 10),)))
    assert relu.samples_per_unit == 8 * 6 * 10 and relu.dead == 0.75


def test_rnn_cell_loop_counts_every_call():
    torch.manual_seed(0)

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(5):
                x = self.act(self.fc(x))
            return x

    (tanh,) = section(Loop(), Batch(args=(torch.randn(16, 8),)))
    assert tanh.calls == 5 and tanh.elements == 5 * 16 * 8


@pytest.mark.parametrize("entry", HEALTHY, ids=lambda z: z.name)
def test_healthy_models_have_no_activation_finding(entry):
    model, batch = entry.build()
    layers = section(model, batch)
    assert activation_findings(layers) == ()
    for a in layers:
        assert a.saturated is None or a.saturated < SATURATED_SHARE
        assert a.dead is None or a.dead < DEAD_SHARE
        assert math.isfinite(a.derivative_rms)
