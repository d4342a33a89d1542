"""The CI gate (--fail-on) and the JSON report's contract (DESIGN.md §3)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gradcheck_cli.api import check
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.gate.fail_on import parse_fail_on
from gradcheck_cli.load.examples import EXAMPLES
from gradcheck_cli.render.json import render_json
from gradcheck_cli.render.text import render_text
from gradcheck_cli.report.report import Problem, Severity
from gradcheck_cli.settings import Autocast, Optimizer, ProbeSettings, Provenance


@pytest.fixture(scope="module")
def reports():
    out = {}
    for name in ("deep-sigmoid", "relu-kaiming", "nan-weight", "deep-linear"):
        model, batch = EXAMPLES[name].build(0)
        out[name] = check(model, batch, source=f"example:{name}", checkpoint_kind="example")
    return out


def test_default_gate_fails_on_errors_only(reports):
    gate = parse_fail_on([])
    assert gate.severity is Severity.ERROR
    assert gate.fails(reports["deep-sigmoid"])
    assert not gate.fails(reports["relu-kaiming"])


def test_gate_by_problem_name(reports):
    assert not parse_fail_on(["exploding"]).fails(reports["deep-sigmoid"])
    assert parse_fail_on(["exploding,non-finite"]).fails(reports["nan-weight"])
    assert parse_fail_on(["vanishing"]).problems == frozenset({Problem.VANISHING})


def test_gate_never_passes_everything(reports):
    assert not any(parse_fail_on(["never"]).fails(r) for r in reports.values())


def test_unknown_fail_on_value_is_an_input_error():
    with pytest.raises(GradcheckError, match="bogus"):
        parse_fail_on(["bogus"])


def test_json_has_the_contract_keys_and_types(reports):
    data = json.loads(render_json(reports["deep-sigmoid"]))
    assert data["schema_version"] == 1
    assert data["status"] == "unhealthy"
    assert data["problems"] == ["vanishing"]
    layer = data["layers"][0]
    assert {"name", "type", "grad_norm", "weight_norm", "act_grad_norm", "act_grad_rel", "flags"} <= set(layer)
    assert layer["name"] == "0" and layer["type"] == "Linear"
    finding = data["findings"][0]
    assert {"code", "severity", "layer", "message"} <= set(finding)
    assert finding["code"] == "GC001"
    rec = data["recommendations"][0]
    assert {"id", "title", "why", "snippet"} <= set(rec)
    assert data["run"]["loss_kind"] == "cross_entropy"
    assert data["path"]["measured_with"] == "activation_gradients"


def test_json_of_healthy_model(reports):
    data = json.loads(render_json(reports["relu-kaiming"]))
    assert data["status"] == "healthy" and data["problems"] == [] and data["recommendations"] == []


def test_json_is_strict_even_with_nan_measurements(reports):
    text = render_json(reports["nan-weight"])
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["problems"] == ["non_finite"]
    assert math.isnan(reports["nan-weight"].run.loss_value)
    assert data["run"]["loss_value"] == "nan"


def test_text_report_has_table_findings_recommendations_and_verdict(reports):
    text = render_text(reports["deep-linear"])
    assert "gradient per layer" in text
    assert "GC002" in text and "exploding-gradient" in text
    assert "clip_grad_norm_" in text
    assert text.rstrip().endswith("✗ unhealthy: exploding")
    assert "\x1b[" not in text  # no colour codes in plain text
    healthy = render_text(reports["relu-kaiming"])
    assert "✓ healthy" in healthy and "recommendations" not in healthy


def test_problem_names_fail_the_gate_on_errors_only_not_on_warnings():
    from zoo import torch_lstm

    model, batch = torch_lstm(20)  # through time 9e-4 of the last step's: a gated cell's warning
    report = check(model, batch)
    assert report.healthy and any(f.severity is Severity.WARNING for f in report.findings)
    assert not parse_fail_on(["vanishing"]).fails(report)
    assert parse_fail_on(["warning"]).fails(report)


def test_multihead_attention_out_proj_is_not_reported_unused():
    from zoo import torch_transformer

    model, batch = torch_transformer()
    assert not [f for f in check(model, batch).findings if f.code == "GC007"]


def _small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), torch.randn(16, 4)


def test_check_takes_frozen_settings_and_keywords_that_replace_their_fields():
    model, batch = _small()
    report = check(model, batch, ProbeSettings(seed=3, train=False), Provenance(source="mine"), seed=5, notes=("n",))
    assert (report.run.seed, report.run.mode, report.run.source) == (5, "eval", "mine")
    assert "n" in report.notes and report.run.batch_source == Provenance().batch_source


def test_check_refuses_a_keyword_that_names_no_setting():
    model, batch = _small()
    with pytest.raises(TypeError, match="'verifiy'"):
        check(model, batch, verifiy=False)


def test_settings_take_the_choices_as_strings_and_refuse_others_in_one_line():
    assert ProbeSettings(autocast="bf16", optimizer=" AdamW ") == ProbeSettings(
        autocast=Autocast.bf16, optimizer=Optimizer.adamw
    )
    with pytest.raises(GradcheckError, match="autocast 'fp32' is not a half precision"):
        ProbeSettings(autocast="fp32")
    with pytest.raises(GradcheckError, match="--optimizer must be one of sgd, adam, adamw, got 'rmsprop'"):
        ProbeSettings(optimizer="rmsprop")
