"""Rules over hand-built measurements: no model is run here."""

from __future__ import annotations

import math

import pytest

from gradcheck_cli.diagnose.rules import RULES, Thresholds, diagnose
from gradcheck_cli.probe.results import LayerMeasure, LossChoice, Norm, ProbeResult
from gradcheck_cli.report.report import Problem, Severity


def chain(act: list[float], *, grads: list[float] | None = None, hooks: bool = True, loss: float = 1.0) -> ProbeResult:
    """A plain chain of Linear layers whose activation gradients are ``act`` (input end first)."""
    grads = grads if grads is not None else act
    layers = tuple(
        LayerMeasure(
            name=f"layers.{i}",
            type="Linear",
            params=10,
            frozen=False,
            weight_norm=1.0,
            grad=Norm(g, abs(g)),
            calls=(Norm(a, abs(a)),) if hooks else (),
        )
        for i, (a, g) in enumerate(zip(act, grads, strict=True))
    )
    order = tuple((i, 0) for i in range(len(act))) if hooks else ()
    return ProbeResult(layers, order, hooks, LossChoice("mse", "mse"), loss, "train", math.isfinite(loss))


def problems(result: ProbeResult, thresholds: Thresholds | None = None) -> set[Problem]:
    return {f.problem for f in diagnose(result, thresholds).findings if f.problem and f.severity is Severity.ERROR}


def test_rule_codes_are_unique_and_stable():
    codes = [r.code for r in RULES]
    assert len(codes) == len(set(codes))
    assert codes[:5] == ["GC001", "GC002", "GC003", "GC004", "GC005"]


def test_flat_chain_is_healthy_with_gain_one():
    diagnosis = diagnose(chain([0.5] * 30))
    assert diagnosis.findings == ()
    assert diagnosis.path.gain == pytest.approx(1.0)
    assert diagnosis.path.attenuation == pytest.approx(1.0)


def test_vanishing_flagged_on_chain_with_factor_0_8_over_50_layers():
    act = [0.8 ** (49 - i) for i in range(50)]
    diagnosis = diagnose(chain(act))
    assert problems(chain(act)) == {Problem.VANISHING}
    assert diagnosis.path.attenuation == pytest.approx(0.8**49)
    assert diagnosis.path.gain == pytest.approx(0.8)
    finding = diagnosis.findings[0]
    assert finding.code == "GC001"
    # 0.8^k < 1e-3 from k = 31: the crossing layer is the 31st from the output
    assert finding.layer == "layers.18"
    flagged = [layer.name for layer in diagnosis.layers if "vanishing" in layer.flags]
    assert flagged == [f"layers.{i}" for i in range(19)]


def test_exploding_flagged_on_chain_with_factor_1_2():
    act = [1.2 ** (49 - i) for i in range(50)]
    diagnosis = diagnose(chain(act))
    assert problems(chain(act)) == {Problem.EXPLODING}
    assert diagnosis.path.gain == pytest.approx(1.2)
    assert diagnosis.findings[0].code == "GC002"


@pytest.mark.parametrize("attenuation", [2e-3, 0.05, 1.0, 30.0, 500.0])
def test_attenuation_inside_the_healthy_band_is_not_flagged(attenuation):
    act = [attenuation] + [1.0] * 10
    assert problems(chain(act)) == set()


def test_thresholds_are_configurable():
    act = [1e-2] + [1.0] * 5
    assert problems(chain(act)) == set()
    assert problems(chain(act), Thresholds(vanishing=0.1, exploding=10)) == {Problem.VANISHING}


def test_gradient_underflow_to_zero_is_vanishing_and_gain_uses_the_nonzero_stretch():
    act = [0.0, 0.0] + [0.5 ** (9 - i) for i in range(10)]
    diagnosis = diagnose(chain(act))
    assert problems(chain(act)) == {Problem.VANISHING}
    assert diagnosis.path.attenuation == 0.0
    assert diagnosis.path.gain == pytest.approx(0.5)
    assert diagnosis.findings[0].evidence["underflowed_calls"] == 2


def test_nan_gradient_is_non_finite_and_skips_attenuation_rules():
    act = [math.nan] * 5
    diagnosis = diagnose(chain(act, loss=math.nan))
    codes = {f.code for f in diagnosis.findings}
    assert codes == {"GC003", "GC004"}
    assert problems(chain(act, loss=math.nan)) == {Problem.NON_FINITE}
    assert all("non_finite" in layer.flags for layer in diagnosis.layers)


def test_norm_that_overflows_float32_with_finite_elements_is_exploding_not_non_finite():
    result = chain([1.0] * 5)
    first = result.layers[0]
    huge = LayerMeasure(first.name, "Linear", 10, False, 1.0, Norm(math.inf, 3e37), (Norm(math.inf, 3e37),))
    result = ProbeResult((huge, *result.layers[1:]), result.call_order, True, result.loss, 1.0, "train", True)
    diagnosis = diagnose(result)
    assert problems(result) == {Problem.EXPLODING}
    assert diagnosis.path.attenuation == math.inf


def test_layer_that_ran_but_got_no_gradient_is_a_cut_path():
    result = chain([1.0, 1.0, 1.0])
    cut = result.layers[0].__class__(
        name="frozen_branch", type="Linear", params=4, frozen=False, weight_norm=1.0, grad=None, calls=(None,)
    )
    result = ProbeResult(
        (cut, *result.layers), ((0, 0), *((i + 1, 0) for i in range(3))), True, result.loss, 1.0, "train", True
    )
    diagnosis = diagnose(result)
    finding = next(f for f in diagnosis.findings if f.code == "GC005")
    assert finding.layer == "frozen_branch"
    assert finding.problem is Problem.VANISHING
    assert diagnosis.layers[0].flags == ("no_gradient",)


def test_layer_that_never_ran_is_reported_as_unused_not_as_a_problem():
    result = chain([1.0, 1.0])
    unused = LayerMeasure("spare", "Linear", 4, False, 1.0, None, ())
    result = ProbeResult((*result.layers, unused), result.call_order, True, result.loss, 1.0, "train", True)
    diagnosis = diagnose(result)
    assert [f.code for f in diagnosis.findings] == ["GC007"]
    assert diagnosis.layers[-1].position == -1


def test_without_hooks_or_biases_the_path_is_not_measured_and_never_called_flat():
    """Parameter gradients stay level while the backward signal explodes (‖∂L/∂W‖ ≈ ‖δ‖·‖x‖): without module
    hooks and without biases to read δ from, the path is 'not measured' (a GC006 warning), not a verdict."""
    grads = [1e-6] + [1.0] * 9
    diagnosis = diagnose(chain([1.0] * 10, grads=grads, hooks=False))
    assert diagnosis.path.measured_with == "not_measured"
    assert [(f.code, f.severity.value) for f in diagnosis.findings] == [("GC006", "warning")]
    assert diagnosis.layers[0].act_grad_norm is None


def test_layer_stats_relative_to_output_end():
    diagnosis = diagnose(chain([0.1, 1.0, 2.0]))
    assert [layer.act_grad_rel for layer in diagnosis.layers] == pytest.approx([0.05, 0.5, 1.0])
    assert [layer.position for layer in diagnosis.layers] == [0, 1, 2]
