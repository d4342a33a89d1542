"""The acceptance test of the cause signals: each known pathology is explained by the right signal, and the
top verified recommendation really restores healthy gradients on a copy, through the public ``check()``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from gradcheck_cli import check
from gradcheck_cli.load.examples import get_example
from gradcheck_cli.render.json import render_json
from gradcheck_cli.render.text import render_text

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def codes(report) -> set[str]:
    return {f.code for f in report.findings}


def top_fix(report):
    """The first recommendation and its verification (they share the order)."""
    assert report.verifications, "recommendations were not verified"
    assert [v.id for v in report.verifications] == [r.id for r in report.recommendations]
    return report.recommendations[0], report.verifications[0]


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("example", "signal", "fix"),
    [
        ("relu-xavier", "GC010", "kaiming_init"),  # wrong init scale: 0.71× Kaiming per layer
        ("deep-linear", "GC010", "orthogonal_init"),  # weights 1.2× orthogonal: too large
        ("dead-relu", "GC012", "kaiming_init"),  # a bias of −10 kills the units after it
        # N(0, 1) weights push sigmoids into their flat tails; batch_norm and activation_change both reach the band
        # (the same effect), and batch_norm's copy lands nearer 1 (attenuation 0.79 against 12), so it ranks first
        ("saturated-sigmoid", "GC011", "batch_norm"),
    ],
)
def test_pathology_is_explained_and_the_top_verified_fix_restores_health(example, signal, fix):
    model, batch = get_example(example).build(0)
    before = state(model)
    report = check(model, batch)
    assert not report.healthy
    assert signal in codes(report)
    rec, verification = top_fix(report)
    assert rec.id == fix
    assert verification.verified and verification.fixed
    assert verification.after is not None and verification.after.status == "healthy"
    assert verification.effect is not None and verification.effect > 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched


def test_deep_sigmoid_is_explained_by_the_sigmoid_derivative_and_fixed_on_a_copy():
    model, batch = get_example("deep-sigmoid").build(0)
    report = check(model, batch)
    assert "GC001" in codes(report) and "GC011" not in codes(report)  # not saturated: σ' ≤ 1/4 is the cause
    assert all(0.2 < a.derivative_rms <= 0.25 for a in report.activations)
    change = next(r for r in report.recommendations if r.id == "activation_change")
    assert "measured φ'(z) has median RMS 0.2" in change.why
    rec, verification = top_fix(report)
    assert verification.fixed, (rec.id, verification)


def test_nan_planted_mid_network_is_located_with_its_inputs():
    model, batch = get_example("nan-weight").build(0)
    report = check(model, batch)
    origin = report.non_finite_origin
    assert origin is not None
    assert origin.forward_module == "2" and origin.forward_type == "Linear"
    assert origin.non_finite_parameters == ("2.weight",)
    (given,) = origin.forward_inputs
    assert given.nan == 0 and given.inf == 0  # its input was clean: the NaN was born here
    assert origin.forward_output is not None and origin.forward_output.nan > 0
    assert origin.backward_module is not None
    assert "first non-finite: forward in 2 (Linear)" in render_text(report)


def test_fp16_model_with_tiny_gradients_gets_the_scaling_advice_with_a_measured_scale():
    model, batch = get_example("fp16-underflow").build(0)
    report = check(model, batch)
    finding = next(f for f in report.findings if f.code == "GC013")
    assert finding.severity.value == "warning"
    assert report.precision is not None and report.precision.lost  # zeros in fp16 that float32 has not
    assert max(share for _, share in report.precision.lost) > 0.2
    rec, verification = top_fix(report)
    assert rec.id == "mixed_precision_scaling"
    exponent = int(math.log2(report.precision.recommended_scale))
    assert f"init_scale=2.0**{exponent}" in rec.snippet and exponent > 10
    # verified: probed in fp16 with the loss scaled (backing off like GradScaler where it overflows)
    assert verification.verified and verification.fixed
    assert "lost to zero went from" in verification.applied and verification.applied.endswith("to 0.0%")


def test_healthy_examples_get_no_recommendation_and_no_verification_cost():
    for name in ("relu-kaiming", "residual"):
        model, batch = get_example(name).build(0)
        report = check(model, batch)
        assert report.healthy and report.recommendations == () and report.verifications == ()
        assert report.init_audit is not None and not any(layer.flag for layer in report.init_audit.layers)


def test_no_verify_leaves_the_recommendations_unverified_in_their_advice_order():
    model, batch = get_example("relu-xavier").build(0)
    report = check(model, batch, verify=False)
    assert report.recommendations and report.verifications == ()


def test_autocast_bf16_probe_reports_what_half_precision_lost():
    model, batch = get_example("relu-kaiming").build(0)
    report = check(model, batch, autocast="bf16")
    assert report.precision is not None and report.precision.autocast == "bf16"
    assert report.precision.scale_used == 1.0
    assert any("autocast" in note for note in report.notes)
    assert report.healthy


def test_autocast_fp16_probe_scales_the_loss_and_reports_unscaled_norms():
    model, batch = get_example("relu-kaiming").build(0)
    plain = check(model, batch)
    report = check(model, batch, autocast="fp16")
    assert report.precision is not None and report.precision.scale_used > 1
    # norms are unscaled: the output layer's gradient agrees with float32 to fp16 accuracy
    out_plain = plain.layers[-1].grad_norm
    out_half = report.layers[-1].grad_norm
    assert out_plain is not None and out_half is not None
    assert out_half == pytest.approx(out_plain, rel=0.05)


def test_json_report_carries_every_cause_section_as_strict_json():
    model, batch = get_example("relu-xavier").build(0)
    data = json.loads(render_json(check(model, batch, steps=2, lr=0.01, autocast="bf16")))
    for key in ("init_audit", "activations", "precision", "non_finite_origin", "verifications", "optimisation"):
        assert key in data
    assert data["init_audit"]["layers"][0]["looks_like"] == "xavier"
    assert data["verifications"][0]["fixed"] is True
    assert len(data["optimisation"]["steps"]) == 3
    assert data["precision"]["recommended_scale"] >= 1
    schema = json.loads((Path(__file__).parents[1] / "docs" / "report.schema.json").read_text())
    assert not list(jsonschema.Draft202012Validator(schema).iter_errors(data))
