"""Recommendations fit the cause: the right fix ranks first, with the measured evidence."""

from __future__ import annotations

import torch
from torch import nn

from gradcheck_cli.api import check
from gradcheck_cli.load.examples import EXAMPLES

ALLOWED_IDS = {
    "xavier_init",
    "kaiming_init",
    "orthogonal_init",
    "gradient_clipping",
    "batch_norm",
    "layer_norm",
    "residual",
    "weight_decay",
    "lstm_gru",
    "lower_lr",
    "mixed_precision_scaling",
    "activation_change",
    "reconnect_graph",
    "forget_gate_bias",
}


def _report(name: str):
    """The advisor's own order: these tests are about its priors, before verification reorders them."""
    model, batch = EXAMPLES[name].build(0)
    return check(model, batch, verify=False)


def test_relu_xavier_gets_kaiming_init_first_with_the_measured_scale():
    report = _report("relu-xavier")
    first = report.recommendations[0]
    assert first.id == "kaiming_init"
    assert "0.71×" in first.why
    assert 'kaiming_normal_(m.weight, nonlinearity="relu")' in first.snippet
    assert "residual" in [r.id for r in report.recommendations]


def test_deep_sigmoid_gets_activation_change_and_normalisation():
    ids = [r.id for r in _report("deep-sigmoid").recommendations]
    assert ids[0] == "activation_change"
    assert "batch_norm" in ids and "residual" in ids
    assert "kaiming_init" not in ids


def test_exploding_linear_gets_clipping_with_a_max_norm_from_the_measurement():
    report = _report("deep-linear")
    ids = [r.id for r in report.recommendations]
    assert ids[0] == "gradient_clipping"
    assert "orthogonal_init" in ids
    clip = report.recommendations[0]
    assert "max_norm=" in clip.snippet and "total gradient norm" in clip.why


def test_plain_rnn_gets_lstm_gru_for_vanishing_and_orthogonal_init_for_exploding():
    assert _report("rnn-vanishing").recommendations[0].id == "lstm_gru"
    exploding = [r.id for r in _report("rnn-exploding").recommendations]
    assert exploding[:2] == ["gradient_clipping", "orthogonal_init"]
    assert "residual" not in exploding


def test_nan_weights_get_restore_and_lower_lr():
    report = _report("nan-weight")
    assert report.recommendations[0].id == "lower_lr"
    assert "NaN/Inf" in report.recommendations[0].why


def test_healthy_model_gets_no_recommendation():
    assert _report("relu-kaiming").recommendations == ()


def test_every_recommendation_id_is_from_the_catalogue():
    checked = 0
    for name, example in EXAMPLES.items():
        recommendations = _report(name).recommendations
        if example.expected != "healthy":
            assert recommendations, f"{name} ({example.expected}) got no recommendation"
        assert len({rec.id for rec in recommendations}) == len(recommendations), name
        for rec in recommendations:
            assert rec.id in ALLOWED_IDS
            assert rec.why and rec.snippet
            checked += 1
    assert checked >= sum(example.expected != "healthy" for example in EXAMPLES.values()) >= 8


def test_detached_branch_gets_reconnect_graph():
    class Cut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).detach())

    report = check(Cut(), torch.randn(3, 4))
    assert [p.value for p in report.problems] == ["vanishing"]
    assert report.findings[0].code == "GC005" and report.findings[0].layer == "a"
    assert [r.id for r in report.recommendations] == ["reconnect_graph"]
