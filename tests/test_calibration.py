"""Calibration: healthy real architectures stay healthy, known pathologies are flagged.

The same models produce the table in docs/calibration.md (``python tests/zoo.py``).
"""

from __future__ import annotations

import pytest

from gradcheck_cli.api import check
from zoo import HEALTHY, SICK, ZooModel

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


GATED_RECURRENT = {
    # zoo entry: (the through-time finding's code, the recurrent module it names)
    "nn.LSTM 20 steps": ("GC008", "LSTM"),
    "nn.GRU 20 steps": ("GC008", "GRU"),
    "nn.LSTMCell unrolled 20 steps": ("GC001", "LSTMCell"),
}
"""The healthy entries that are gated RNNs: their gradient fades through time but stays above 1e-10 of the last
step's, where gated cells still learn (a warning, not a problem)."""
UNLEARNABLE = {
    "nn.LSTM 100 steps": ("GC008", "LSTM"),
    "nn.GRU 200 steps": ("GC008", "GRU"),
    "nn.LSTMCell unrolled 50 steps": ("GC001", "LSTMCell"),
}
"""The sick entries that are gated RNNs: below 1e-10 of the last step's, an error (docs/calibration.md)."""


def test_the_gated_recurrent_entries_are_in_the_zoo():
    assert GATED_RECURRENT.keys() <= {e.name for e in HEALTHY}
    assert UNLEARNABLE.keys() <= {e.name for e in SICK}


@pytest.mark.parametrize("entry", HEALTHY, ids=[e.name for e in HEALTHY])
def test_no_false_alarm_on_healthy_architecture(entry: ZooModel):
    model, batch = entry.build()
    report = check(model, batch)
    assert report.problems == (), [f.message for f in report.findings]
    assert report.path.attenuation is not None
    recurrent = [
        (f.code, f.severity.value, f.evidence["recurrent"]) for f in report.findings if f.evidence.get("recurrent")
    ]
    if entry.name in GATED_RECURRENT:
        code, module = GATED_RECURRENT[entry.name]
        assert recurrent == [(code, "warning", module)], report.findings
    else:
        assert recurrent == []
        # the margin: healthy feed-forward paths sit within ~1.5 orders of magnitude of the output's gradient
        assert 10**-2 < report.path.attenuation < 10**2


@pytest.mark.parametrize("entry", SICK, ids=[e.name for e in SICK])
def test_pathology_is_flagged_with_its_problem(entry: ZooModel):
    model, batch = entry.build()
    report = check(model, batch)
    assert [p.value for p in report.problems] == [entry.expected]
    assert report.recommendations, "a sick model gets at least one recommendation"


def test_relu_xavier_gain_is_one_over_root_two():
    model, batch = next(e for e in SICK if e.name == "relu-xavier-50").build()
    report = check(model, batch)
    assert report.path.gain == pytest.approx(2**-0.5, rel=0.05)


def test_linear_1_2x_gain_is_1_2():
    model, batch = next(e for e in SICK if e.name.startswith("linear-orthogonal")).build()
    report = check(model, batch)
    assert report.path.gain == pytest.approx(1.2, rel=0.02)


def test_relu_kaiming_gain_is_one():
    model, batch = next(e for e in HEALTHY if e.name == "relu-kaiming-50").build()
    assert check(model, batch).path.gain == pytest.approx(1.0, abs=0.02)


def _zoo(name: str):
    entry = next(e for e in HEALTHY + SICK if e.name == name)
    model, batch = entry.build()
    return check(model, batch)


def test_gated_cells_vanishing_through_time_is_a_warning_with_forget_gate_advice():
    for name, code in (("nn.LSTM 20 steps", "GC008"), ("nn.LSTMCell unrolled 20 steps", "GC001")):
        report = _zoo(name)
        assert report.healthy
        finding = next(f for f in report.findings if f.code == code)
        assert finding.severity.value == "warning"
        assert [r.id for r in report.recommendations] == ["forget_gate_bias"]


@pytest.mark.parametrize("name", sorted(UNLEARNABLE))
def test_gated_cells_below_the_trainability_boundary_are_an_error(name: str):
    """Below 1e-10 of the last step's gradient, gated cells failed to learn the first steps in every calibration
    run: an error, named as such, with the forget-gate advice."""
    code, module = UNLEARNABLE[name]
    report = _zoo(name)
    finding = next(f for f in report.findings if f.code == code)
    assert (finding.severity.value, finding.evidence["recurrent"]) == ("error", module)
    assert finding.evidence["attenuation"] < 1e-10
    assert "failed to learn a dependency on the first steps" in finding.message
    assert "forget_gate_bias" in [r.id for r in report.recommendations]


def test_the_gradient_through_time_is_not_read_as_zero_while_its_elements_are_not():
    """The per-step norm is taken in float64: in float32 the squares of elements below ~1e-22 flush to 0, and
    the GRU over 200 steps read "exactly 0 from 103 steps back" while every element at step 0 was non-zero."""
    report = _zoo("nn.GRU 200 steps")
    finding = next(f for f in report.findings if f.code == "GC008")
    assert 0 < finding.evidence["attenuation"] < 1e-30
    assert "underflow_steps_back" not in finding.evidence


def test_fused_plain_rnn_through_time_is_measured_from_the_input_gradient_per_step():
    report = _zoo("nn.RNN fused 200 (radius 0.5)")
    rnn = next(layer for layer in report.layers if layer.name == "rnn")
    assert len(rnn.time_grad_norms) == 200
    assert rnn.time_grad_norms[0] < 1e-3 * rnn.time_grad_norms[-1]
    assert [f.code for f in report.findings] == ["GC008"]
    ids = [r.id for r in report.recommendations]
    assert ids[:2] == ["orthogonal_init", "lstm_gru"]  # verified to help (not enough alone), then unverifiable
    orthogonal = report.verifications[0]
    assert orthogonal.verified and not orthogonal.fixed and orthogonal.effect and orthogonal.effect > 1
    exploding = _zoo("nn.RNN fused 200 (radius 2.0)")
    assert [f.code for f in exploding.findings] == ["GC009"]  # float32: no half-precision forecast unless asked
