"""The initialisation audit (GC010): scales, schemes, activations, the calibrated rule, trained weights.

``python tests/test_init_audit.py [N]`` prints the tables docs/init_audit.md holds: the zoo calibration, a sweep
of N fresh weights through the trained-weights tests (default 5000) and the statistics of the trained models.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zoo
from gradcheck_cli.diagnose.following import DERIVED_GAINS
from gradcheck_cli.diagnose.init_audit import (
    COMPOUND_LIMIT,
    INIT_SCALE,
    LAYER_LIMIT,
    audit_init,
    gradient_factor,
    init_findings,
)
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import mlp
from gradcheck_cli.report.report import Problem, Severity
from gradcheck_cli.report.sections import InitAudit, InitLayer

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def leaf_calls(model: nn.Module, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
    """(name, class name) of every leaf-module call of one forward pass, as the probe records them."""
    calls: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:

            def hook(mod: nn.Module, inputs: Any, name: str = name) -> None:
                calls.append((name, type(mod).__name__))

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def audited(model: nn.Module, batch: Batch | torch.Tensor, **options: Any) -> InitAudit:
    if isinstance(batch, torch.Tensor):
        batch = Batch(args=(batch,))
    return audit_init(model, leaf_calls(model, *batch.args, **batch.kwargs), **options)


def by_name(audit: InitAudit) -> dict[str, InitLayer]:
    return {layer.layer: layer for layer in audit.layers}


def gc010(audit: InitAudit) -> dict[Problem | None, Any]:
    findings = init_findings(audit)
    assert all(f.code == INIT_SCALE.code == "GC010" and f.severity is Severity.WARNING for f in findings)
    assert len({f.problem for f in findings}) == len(findings), "one finding per direction"
    return {f.problem: f for f in findings}


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# --- scales and schemes ------------------------------------------------------------------------------------


def test_xavier_before_relu_sits_at_one_over_root_two_of_kaiming() -> None:
    seeded()
    model = mlp(6, 256, nn.ReLU, nn.init.xavier_normal_)
    audit = audited(model, torch.randn(8, 256))
    hidden = audit.layers[:-1]
    assert [layer.layer for layer in audit.layers] == ["0", "2", "4", "6", "8", "10"]
    for layer in hidden:
        assert layer.activation == "relu" and layer.gain == pytest.approx(math.sqrt(2))
        assert (layer.fan_in, layer.fan_out) == (256, 256)
        assert layer.kaiming_std == pytest.approx(math.sqrt(2 / 256))
        assert layer.xavier_std == pytest.approx(math.sqrt(2) * math.sqrt(2 / 512))
        assert layer.ratio == pytest.approx(1 / math.sqrt(2), abs=0.02)
        assert layer.looks_like == "xavier"
    head = audit.layers[-1]
    assert head.activation == "linear" and head.gain == 1.0 and (head.fan_in, head.fan_out) == (256, 10)
    assert head.ratio == pytest.approx(math.sqrt(2 / 266) * 16, rel=0.05)  # Xavier std × √fan_in


def test_pytorch_default_init_is_recognised_for_linear_and_conv() -> None:
    seeded()
    model = nn.Sequential(nn.Conv2d(8, 32, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32 * 6 * 6, 64))
    audit = audited(model, torch.randn(2, 8, 8, 8))
    conv, linear = audit.layers
    assert conv.looks_like == linear.looks_like == "pytorch_default"
    assert (conv.fan_in, conv.fan_out) == (8 * 9, 32 * 9)
    assert conv.std == pytest.approx(1 / math.sqrt(3 * 72), rel=0.05)
    assert conv.activation == "tanh" and conv.gain == pytest.approx(5 / 3)
    assert conv.ratio == pytest.approx(1 / math.sqrt(3) / (5 / 3), rel=0.05)
    assert linear.activation == "linear" and linear.ratio == pytest.approx(1 / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        (lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"), "kaiming"),
        (lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"), "kaiming"),
        (lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), "kaiming_fan_out"),
        (lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"), "lecun"),
        (nn.init.xavier_uniform_, "xavier"),
        (lambda w: nn.init.normal_(w, std=0.02), "normal_0.02"),
        (lambda w: nn.init.trunc_normal_(w, std=0.02), "normal_0.02"),
        (nn.init.orthogonal_, "orthogonal"),
        (lambda w: nn.init.orthogonal_(w, gain=1.2), "orthogonal"),
        (nn.init.zeros_, "zeros"),
        (lambda w: nn.init.normal_(w, std=0.3), "unknown"),
    ],
)
def test_looks_like_names_the_nearest_scheme(init: Callable[[torch.Tensor], object], expected: str) -> None:
    seeded()
    layer = nn.Linear(96, 384)  # not square: Xavier, LeCun and both Kaiming modes differ
    with torch.no_grad():
        init(layer.weight)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(384, 4))
    assert audited(model, torch.randn(2, 96)).layers[0].looks_like == expected


def test_kaiming_matches_its_activation_exactly() -> None:
    seeded()
    init = lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")  # noqa: E731
    audit = audited(mlp(4, 512, nn.ReLU, init), torch.randn(4, 512))
    assert [round(layer.ratio, 1) for layer in audit.layers[:-1]] == [1.0, 1.0, 1.0]
    assert audit.layers[0].std == pytest.approx(math.sqrt(2 / 512), rel=0.01)


@pytest.mark.parametrize("shape", [(128, 128), (64, 256), (256, 64), (16, 3, 3, 3), (3, 2)])
def test_orthogonal_is_detected_from_the_gram_matrix(shape: tuple[int, ...]) -> None:
    seeded()
    weight = torch.empty(shape)
    nn.init.orthogonal_(weight, gain=0.7)
    conv = len(shape) == 4
    layer = nn.Conv2d(shape[1], shape[0], shape[2]) if conv else nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
    assert audit_init(layer, [("", type(layer).__name__)]).layers[0].looks_like == "orthogonal"
    with torch.no_grad():
        layer.weight.normal_()
    assert audit_init(layer, [("", type(layer).__name__)]).layers[0].looks_like != "orthogonal"


def test_identity_and_per_gate_orthogonal_recurrent_weights_are_orthogonal() -> None:
    seeded()
    lstm = nn.LSTM(32, 32)
    with torch.no_grad():
        for chunk in lstm.weight_hh_l0.chunk(4, 0):
            nn.init.orthogonal_(chunk)
    eye = nn.Linear(64, 64)
    nn.init.eye_(eye.weight)
    assert by_name(audit_init(lstm, []))["weight_hh_l0"].looks_like == "orthogonal"
    assert by_name(audit_init(lstm, []))["weight_ih_l0"].looks_like == "pytorch_default"
    assert audit_init(eye, []).layers[0].looks_like == "orthogonal"


def test_hf_conv1d_is_transposed_and_gpt2_is_normal_002() -> None:
    model, batch = zoo.hf_gpt2(False)
    layers = by_name(audited(model, batch))
    c_attn, c_fc = layers["transformer.h.0.attn.c_attn"], layers["transformer.h.0.mlp.c_fc"]
    assert c_attn.type == "Conv1D" and (c_attn.fan_in, c_attn.fan_out) == (64, 192)
    assert c_attn.looks_like == "normal_0.02" and c_attn.ratio == pytest.approx(0.02 * 8, rel=0.05)
    assert c_fc.activation == "gelu" and c_fc.gain == DERIVED_GAINS["gelu"]  # NewGELUActivation
    assert layers["transformer.h.0.attn.c_proj"].normalised  # ln_2 follows
    assert "lm_head" in layers and "transformer.wte" not in layers  # tied to an Embedding: counted once


# --- what follows a layer ----------------------------------------------------------------------------------


class Functional(nn.Module):
    """torch.relu between two Linear layers: no activation module to see."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Mixed(nn.Module):
    """Activations behind BatchNorm, Dropout and a nested Sequential, a Conv1d, and a LayerNorm after SiLU."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.second = nn.Sequential(nn.Linear(32, 32), nn.Dropout(0.1), nn.LeakyReLU(0.2))
        self.third = nn.Linear(32, 32)
        self.act = nn.Sequential(nn.Identity(), nn.GELU())
        self.conv = nn.Conv1d(1, 4, 3)
        self.tail = nn.Sequential(nn.SiLU(), nn.LayerNorm(30), nn.Tanh(), nn.Flatten(), nn.Linear(120, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.third(self.second(self.first(x))))
        return self.tail(self.conv(h[:, None]))


def test_activation_is_the_first_activation_module_until_the_next_weight() -> None:
    seeded()
    layers = by_name(audited(Mixed(), torch.randn(4, 16)))
    first, second, third = layers["first.0"], layers["second.0"], layers["third"]
    conv, head = layers["conv"], layers["tail.4"]
    assert (first.activation, first.normalised) == ("relu", True)  # through BatchNorm
    assert first.gain == pytest.approx(math.sqrt(2))
    assert (second.activation, second.normalised) == ("leaky_relu(0.2)", False)  # through Dropout
    assert second.gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.2))
    assert third.activation == "gelu" and third.gain == DERIVED_GAINS["gelu"]  # past an Identity
    assert (conv.activation, conv.normalised) == ("silu", True)  # the first activation; a norm follows
    assert conv.type == "Conv1d" and (conv.fan_in, conv.fan_out) == (3, 12)
    assert (head.activation, head.normalised) == ("linear", False)
    functional = by_name(audited(Functional(), torch.randn(2, 16)))
    assert functional["fc1"].activation == "linear"  # torch.relu is invisible to module hooks


def test_derived_gains_keep_the_gradients_second_moment() -> None:
    z = torch.linspace(-12, 12, 400_001, dtype=torch.float64, requires_grad=True)
    weight = torch.exp(-(z.detach() ** 2) / 2) / math.sqrt(2 * math.pi) * (24 / 400_000)
    functions = {
        "gelu": nn.functional.gelu,
        "silu": nn.functional.silu,
        "mish": nn.functional.mish,
        "elu": nn.functional.elu,
        "hardswish": nn.functional.hardswish,
        "softplus": nn.functional.softplus,
    }
    assert set(functions) == set(DERIVED_GAINS)
    for name, function in functions.items():
        (slope,) = torch.autograd.grad(function(z).sum(), z)
        assert 1 / math.sqrt(float((weight * slope**2).sum())) == pytest.approx(DERIVED_GAINS[name], abs=1e-3)


def test_recurrent_weights_use_their_own_nonlinearity_and_never_compound() -> None:
    seeded()
    rnn = nn.RNN(8, 64, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(100.0)
    layers = by_name(audit_init(rnn, [("", "RNN")]))
    hh = layers["weight_hh_l0"]
    assert (hh.activation, hh.gain, hh.type) == ("tanh", pytest.approx(5 / 3), "RNN")
    assert layers["weight_ih_l0"].looks_like == "pytorch_default"  # U(±1/√hidden), not 1/√fan_in
    assert hh.flag is None  # GC008/GC009 measure the recurrence through time
    gru = by_name(audit_init(nn.GRU(8, 16, num_layers=2, bidirectional=True), []))
    assert len(gru) == 8 and {layer.activation for layer in gru.values()} == {"gates"}
    assert gru["weight_hh_l1_reverse"].fan_in == 16


# --- the rule on the calibration zoo -----------------------------------------------------------------------


@pytest.mark.parametrize("entry", zoo.HEALTHY, ids=lambda e: e.name)
def test_no_gc010_on_healthy_models(entry: zoo.ZooModel) -> None:
    model, batch = entry.build()
    audit = audited(model, batch)
    assert audit.layers and audit.skipped is None and audit.trained_layers == ()
    assert not [layer.layer for layer in audit.layers if layer.flag]
    assert init_findings(audit) == ()


@pytest.mark.parametrize(
    ("name", "problem", "layer"),
    [
        ("relu-xavier-50", Problem.VANISHING, "0"),
        ("sigmoid-default-50", Problem.VANISHING, "0"),
        ("sigmoid-normal-50 (width 256)", Problem.EXPLODING, "0"),
        ("linear-orthogonal-1.2x-50", Problem.EXPLODING, "0"),
        ("weights ×1e30 (finite, norm overflows)", Problem.EXPLODING, "2"),
    ],
)
def test_gc010_on_models_sick_from_their_init(name: str, problem: Problem, layer: str) -> None:
    model, batch = next(e for e in zoo.SICK if e.name == name).build()
    findings = gc010(audited(model, batch))
    assert list(findings) == [problem]
    assert findings[problem].layer == layer


def test_relu_xavier_finding_explains_the_compounding() -> None:
    model, batch = next(e for e in zoo.SICK if e.name == "relu-xavier-50").build()
    audit = audited(model, batch)
    finding = gc010(audit)[Problem.VANISHING]
    evidence = finding.evidence
    assert evidence["run_length"] == 50 and len(evidence["layers"]) == 49  # the Xavier head is 1.39×
    assert evidence["looks_like"] == "xavier" and evidence["ratio"] == pytest.approx(0.707, abs=0.02)
    assert 1e-8 < evidence["compounded"] < 1e-6  # 0.707^49 × 1.39
    assert evidence["compound_limit"] == COMPOUND_LIMIT
    assert "relu layers with xavier init: 49 of 50" in finding.message
    assert "0.71× the Kaiming scale" in finding.message and "kaiming_normal_" in finding.message
    assert [layer.flag for layer in audit.layers] == ["too_small"] * 49 + [None]


def test_deep_linear_orthogonal_12x_compounds_to_1_2_to_the_50() -> None:
    model, batch = next(e for e in zoo.SICK if e.name == "linear-orthogonal-1.2x-50").build()
    finding = gc010(audited(model, batch))[Problem.EXPLODING]
    assert finding.evidence["looks_like"] == "orthogonal"
    assert finding.evidence["compounded"] == pytest.approx(1.2**50, rel=0.01)


@pytest.mark.parametrize(
    ("scale", "problem", "flag"), [(100.0, Problem.EXPLODING, "too_large"), (0.01, Problem.VANISHING, "too_small")]
)
def test_one_layer_scaled_in_a_normal_network(scale: float, problem: Problem, flag: str) -> None:
    model, batch = zoo.scaled_weight(None, scale)
    audit = audited(model, batch)
    assert [layer.flag for layer in audit.layers] == [None, flag, None, None]  # the others are not blamed
    finding = gc010(audit)[problem]
    assert finding.layer == "2" and finding.evidence["single_layers"] == ["2"]
    assert finding.evidence["ratio"] == pytest.approx(scale / math.sqrt(6), rel=0.05)  # default init: 1/√6 of ReLU's
    clean, batch = zoo.scaled_weight(None, 1.0)
    assert gc010(audited(clean, batch)) == {}


def test_normalisation_stops_compounding_and_single_layer_flags() -> None:
    seeded()
    layers: list[nn.Module] = []
    for _ in range(30):
        linear = nn.Linear(64, 64)
        nn.init.xavier_normal_(linear.weight)
        linear.weight.data.mul_(0.01)
        layers += [linear, nn.BatchNorm1d(64), nn.ReLU()]
    audit = audited(nn.Sequential(*layers), torch.randn(8, 64))
    assert all(layer.normalised and layer.ratio < 0.01 for layer in audit.layers)
    assert init_findings(audit) == ()


def test_attention_projections_count_once_in_a_run() -> None:
    from gradcheck_cli.diagnose.init_audit import _runs

    model, batch = zoo.hf_bert(False)
    audit = audited(model, batch)
    names = [f"encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
    (run,) = [r for r in _runs(audit.layers, set()) if r.members and r.members[0].layer == names[0]]
    assert [m.layer for m in run.members] == names  # then attention.output.dense, normalised, ends it
    logs = [math.log10(m.ratio) for m in run.members]
    assert run.log10 == pytest.approx(statistics.fmean(logs))  # side by side, not in series
    assert sum(logs) < -2.3 and not any(layer.flag for layer in audit.layers)


def test_limits_are_the_documented_ones() -> None:
    assert math.isclose(LAYER_LIMIT, 10**1.5) and math.isclose(COMPOUND_LIMIT, 10**3)


@pytest.mark.parametrize(("depth", "flagged"), [(8, False), (9, True)])
def test_default_init_relu_stack_flags_where_its_path_would(depth: int, flagged: bool) -> None:
    # 0.41 per hidden layer (1/√6 of ReLU's need): 10^-2.96 at 8 layers, 10^-3.35 at 9, as GC001 measures
    seeded()
    audit = audited(mlp(depth, 256, nn.ReLU, None), torch.randn(4, 256))
    assert [layer.looks_like for layer in audit.layers] == ["pytorch_default"] * depth
    assert (Problem.VANISHING in gc010(audit)) == flagged


def test_tanh_compounds_at_its_small_signal_slope() -> None:
    seeded()
    xavier = audited(mlp(30, 128, nn.Tanh, nn.init.xavier_normal_), torch.randn(4, 128))
    assert xavier.layers[0].ratio == pytest.approx(0.6, abs=0.03)  # 1/(5/3): but Glorot's tanh setup is fine
    assert [gradient_factor(layer) for layer in xavier.layers[:-1]] == pytest.approx([1.0] * 29, abs=0.02)
    assert init_findings(xavier) == ()
    default = audited(mlp(12, 256, nn.Tanh, None), torch.randn(4, 256))
    assert gradient_factor(default.layers[0]) == pytest.approx(1 / math.sqrt(3), rel=0.03)
    assert init_findings(default) == ()  # 0.58^12 = 1.4e-3; measured path 1.7e-3
    deep = audited(mlp(16, 256, nn.Tanh, None), torch.randn(4, 256))
    finding = gc010(deep)[Problem.VANISHING]
    assert "at tanh's small-signal slope of 1" in finding.message
    assert finding.evidence["compounded"] == pytest.approx(3**-8, rel=0.2)
    wild = audited(mlp(10, 256, nn.Tanh, nn.init.normal_), torch.randn(4, 256))
    assert list(gc010(wild)) == [Problem.EXPLODING]  # 16/(5/3) = 9.6 per layer


# --- trained weights ---------------------------------------------------------------------------------------


def teacher_task(features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from a random tanh teacher: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(features, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(2048, features, generator=g)
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def blob_task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Which quadrant of a noisy 12×12 RGB image holds a bright square."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 3, 12, 12, generator=g) * 0.5
    y = torch.randint(0, 4, (1024,), generator=g)
    for quadrant in range(4):
        row, col = divmod(quadrant, 2)
        x[y == quadrant, :, row * 6 + 1 : row * 6 + 5, col * 6 + 1 : col * 6 + 5] += 1.0
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> tuple[float, float]:
    """Adam at 1e-3 on batches of 64; the full-data loss before and after."""
    seeded(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        before = float(loss(model(x), y))
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,))
        optimiser.zero_grad()
        loss(model(x[index]), y[index]).backward()
        optimiser.step()
    with torch.no_grad():
        return before, float(loss(model(x), y))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


@pytest.mark.parametrize(("build", "task"), [(small_mlp, lambda: teacher_task(64)), (small_cnn, blob_task)])
def test_weights_trained_with_adam_are_detected(build: Callable[[], nn.Module], task: Callable[[], Any]) -> None:
    seeded(1)
    model = build()
    x, y = task()
    assert audited(model, x[:8]).skipped is None  # the same model, freshly initialised
    before, after = train(model, x, y)
    assert after < 0.2 * before  # it learned
    audit = audited(model, x[:8])
    assert audit.skipped is not None and audit.skipped.startswith("weights look trained: ")
    assert len(audit.trained_layers) >= 2
    assert all(layer.flag is None for layer in audit.layers) and init_findings(audit) == ()


def test_one_trained_layer_is_listed_and_left_out_of_the_rule() -> None:
    seeded(1)
    model = small_mlp()
    x, y = teacher_task(64)
    train(model, x, y)
    fresh = mlp(24, 128, nn.ReLU, nn.init.xavier_normal_, in_features=64)
    fresh[0] = model[0]  # a trained first layer ahead of a Xavier-ReLU stack
    audit = audited(fresh, x[:8])
    assert audit.skipped is None and audit.trained_layers == ("0",)
    assert by_name(audit)["0"].flag is None and by_name(audit)["2"].flag == "too_small"
    assert gc010(audit)[Problem.VANISHING].evidence["run_first"] == "2"


INITS: dict[str, Callable[[torch.Tensor], object]] = {
    "default": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "kaiming_fan_out": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
    "normal_0.02": lambda w: nn.init.normal_(w, std=0.02),
    "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=1.0, a=-2.0, b=2.0),
    "sparse": lambda w: nn.init.sparse_(w, 0.5),
    "uniform_0_1": nn.init.uniform_,
}
SHAPES = [(1, 64), (2, 2), (4, 9), (10, 64), (64, 10), (16, 27), (64, 64), (128, 576), (300, 40), (1000, 16)]


@pytest.mark.parametrize("scheme", sorted(INITS))
def test_fresh_weights_of_every_scheme_do_not_look_trained(scheme: str) -> None:
    model = nn.ModuleList(nn.Linear(cols, rows, bias=False) for rows, cols in SHAPES * 10)
    for seed, layer in enumerate(model):
        torch.manual_seed(seed)
        assert isinstance(layer, nn.Linear)
        with torch.no_grad():
            INITS[scheme](layer.weight)
    audit = audit_init(model, [])
    assert len(audit.layers) == 100 and audit.trained_layers == () and audit.skipped is None


def test_trained_reason_skips_the_flags_but_lists_the_layers() -> None:
    model, batch = next(e for e in zoo.SICK if e.name == "relu-xavier-50").build()
    reason = "the checkpoint holds optimizer state"
    audit = audited(model, batch, trained=reason)
    assert audit.skipped == reason and len(audit.layers) == 50
    assert audit.layers[0].ratio == pytest.approx(0.707, abs=0.02)
    assert all(layer.flag is None for layer in audit.layers) and init_findings(audit) == ()


# --- robustness and purity ---------------------------------------------------------------------------------


def test_awkward_weights() -> None:
    seeded()
    nan = nn.Linear(8, 8)
    nan.weight.data[0, 0] = float("nan")
    tied = nn.Linear(8, 8)
    model = nn.Sequential(
        nn.Linear(0, 8),  # zero-size weight
        nn.Linear(8, 1),  # one row
        nn.Linear(1, 8),
        nan,
        tied,
        nn.Linear(8, 8).half(),
        nn.Linear(8, 8).to(torch.bfloat16),
        nn.LazyLinear(8),
    )
    twin = nn.Linear(8, 8)
    twin.weight = tied.weight
    model.append(twin)
    sparse = nn.Linear(8, 8)
    sparse.weight = nn.Parameter(sparse.weight.detach().to_sparse())
    model.append(sparse)
    layers = by_name(audit_init(model, []))
    assert sorted(layers) == ["1", "2", "4", "5", "6"]  # empty, NaN, lazy, tied twin and sparse skipped
    assert layers["1"].fan_out == 1 and layers["2"].fan_in == 1
    for half in ("5", "6"):
        assert layers[half].looks_like == "pytorch_default" and math.isfinite(layers[half].ratio)
    with torch.device("meta"):
        meta = nn.Linear(8, 8)
    assert audit_init(meta, []) == InitAudit(layers=(), skipped="no Linear, Conv or recurrent weights to audit")


def test_large_weights_are_sampled_cheaply() -> None:
    seeded()
    layer = nn.Linear(1024, 8192, bias=False)  # 8.4M entries
    layer2 = nn.Linear(8192, 1024, bias=False)
    model = nn.Sequential(layer, nn.ReLU(), layer2)
    audit = audit_init(model, [("0", "Linear"), ("1", "ReLU"), ("2", "Linear")])
    first, second = audit.layers
    assert first.std == pytest.approx(1 / math.sqrt(3 * 1024), rel=0.01) and first.looks_like == "pytorch_default"
    assert second.std == pytest.approx(1 / math.sqrt(3 * 8192), rel=0.01) and audit.trained_layers == ()


def test_definition_order_stands_in_without_calls() -> None:
    seeded()
    audit = audit_init(mlp(3, 32, nn.ReLU, None), [])
    assert [layer.activation for layer in audit.layers] == ["relu", "relu", "linear"]


def test_audit_is_pure(capsys: pytest.CaptureFixture[str]) -> None:
    model, batch = next(e for e in zoo.SICK if e.name == "relu-xavier-50").build()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = leaf_calls(model, *batch.args)
    init_findings(audit_init(model, calls))
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert capsys.readouterr() == ("", "")


# --- the calibration table (docs/init_audit.md) ------------------------------------------------------------


def calibration_rows() -> list[tuple[str, str, float, float, int, str]]:
    """(model, expected, median ratio, most extreme run product, weights, GC010) per zoo model."""
    from gradcheck_cli.diagnose.init_audit import _runs  # every run, flagged or not

    rows = []
    for entry in zoo.ZOO:
        model, batch = entry.build()
        audit = audited(model, batch)
        median = statistics.median(layer.ratio for layer in audit.layers)
        runs = _runs(audit.layers, set(audit.trained_layers))
        products = [r.product for r in runs if r.members] + [m.ratio for r in runs for m in r.alone]
        worst = max(products, key=lambda p: abs(math.log10(p)), default=1.0)
        verdict = ", ".join(f"{f.problem.value} from {f.layer}" for f in init_findings(audit) if f.problem)
        rows.append((entry.name, entry.expected, median, worst, len(audit.layers), verdict or "—"))
    return rows


def fresh_sweep(count: int) -> tuple[int, int, dict[str, float]]:
    """Fresh weights of random shapes and schemes: (audited, looking trained, largest value of each statistic)."""
    import random

    from gradcheck_cli.diagnose.weight_statistics import MEAN_DRIFT, trained_evidence, weight_stats

    rng = random.Random(0)
    dims = [1, 2, 3, 4, 5, 8, 9, 10, 16, 27, 32, 64, 72, 100, 128, 256, 576, 1000]
    worst = {"spread_z": -math.inf, "spike_excess": -math.inf, "mean_z": -math.inf}
    audited_count = looking_trained = 0
    for trial in range(count):
        rows, cols = rng.choice(dims), rng.choice(dims)
        if rows * cols > 300_000:
            continue
        weight = torch.empty(rows, cols)
        torch.manual_seed(trial)
        INITS[rng.choice(sorted(INITS))](weight)
        stats = weight_stats(weight)
        if stats is None or stats.orthogonal or stats.std == 0 or stats.constant:
            continue
        audited_count += 1
        looking_trained += trained_evidence(stats) is not None
        if stats.spread_z is not None:
            worst["spread_z"] = max(worst["spread_z"], stats.spread_z)
        if stats.spike is not None:  # in units of the limit's margin: the limit is 1 + 2·side^(-2/3)
            excess = (stats.spike - 1) / (stats.spike_limit - 1) * 2
            worst["spike_excess"] = max(worst["spike_excess"], excess)
        if stats.mean_share <= MEAN_DRIFT:
            worst["mean_z"] = max(worst["mean_z"], stats.mean_z)
    return audited_count, looking_trained, worst


def trained_rows() -> list[tuple[str, str, str, str, str, str]]:
    """(model, layer, spike / limit, spread (z), mean z, verdict) after the tests' training."""
    from gradcheck_cli.diagnose.weight_statistics import trained_evidence, weight_stats

    rows = []
    for name, build, task in (
        ("mlp 64-128-128-10", small_mlp, lambda: teacher_task(64)),
        ("cnn", small_cnn, blob_task),
    ):
        seeded(1)
        model = build()
        x, y = task()
        before, after = train(model, x, y)
        for layer, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                stats = weight_stats(module.weight.detach().reshape(module.weight.shape[0], -1))
                assert stats is not None
                spike = "—" if stats.spike is None else f"{stats.spike:.2f} / {stats.spike_limit:.2f}"
                spread = "—" if stats.spread is None else f"{stats.spread:.2f} ({stats.spread_z:.1f})"
                rows.append(
                    (
                        f"{name} (loss {before:.2f}→{after:.2f})",
                        f"{layer} {tuple(module.weight.shape)}",
                        spike,
                        spread,
                        f"{stats.mean_z:.1f}",
                        trained_evidence(stats) or "looks initialised",
                    )
                )
    return rows


if __name__ == "__main__":
    print("| model | expected | median ratio | most extreme run | audited weights | GC010 |")
    print("|---|---|---|---|---|---|")
    for name, expected, median, worst, count, verdict in calibration_rows():
        print(f"| {name} | {expected} | {median:.3g} | {worst:.3g} | {count} | {verdict} |")
    print()
    total, trained, maxima = fresh_sweep(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
    print(
        f"fresh sweep: {total} weights, {trained} look trained; largest: "
        + ", ".join(f"{k} {v:.2f}" for k, v in maxima.items())
    )
    print()
    print("| model | layer | top singular value / limit | row/col spread (z) | mean z | verdict |")
    print("|---|---|---|---|---|---|")
    for row in trained_rows():
        print("| " + " | ".join(row) + " |")
