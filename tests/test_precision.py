"""Half precision: exponent histograms, the shares fp16/bf16 would lose, the recommended loss scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcheck_cli.diagnose.precision import precision_findings, precision_layer, precision_section
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import get_example, mlp
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.probe.precision import SAMPLE, exponent_histogram, grouped_histograms, recommended_scale
from zoo import HEALTHY

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def hist(values: list[float]) -> list[float]:
    return [float(v) for v in exponent_histogram(torch.tensor(values, dtype=torch.float32)).tolist()]


def test_shares_match_a_real_cast_to_half():
    g = torch.logspace(-12, 6, 5000, dtype=torch.float32) * torch.sign(torch.randn(5000))
    layer = precision_layer("x", hist(g.tolist()), float(g.abs().max()), 1.0)
    half = g.half()
    assert layer.fp16_flush == pytest.approx((half == 0).double().mean().item(), abs=2e-3)
    assert layer.fp16_overflow == pytest.approx(half.isinf().double().mean().item(), abs=2e-3)
    assert layer.fp16_overflow > 0.05  # 1e6 ≥ 2^16 for the top 1.2 of 18 decades
    subnormal = (g.abs() < 2**-14).double().mean().item()
    assert layer.fp16_subnormal == pytest.approx(subnormal, abs=2e-3)
    assert layer.bf16_flush == pytest.approx((g.bfloat16() == 0).double().mean().item(), abs=2e-3)


def test_zeros_and_non_finite_are_counted_apart():
    layer = precision_layer("x", hist([0.0, 0.0, 1e-9, 1.0, float("inf"), float("nan")]), 1.0, 1.0)
    assert layer.elements == 6 and layer.zero == pytest.approx(2 / 6)
    assert layer.fp16_flush == pytest.approx(1 / 2)  # of the finite non-zero elements: 1e-9 of {1e-9, 1}
    assert layer.fp16_overflow == 0.0  # NaN/Inf were there in float32 already: not fp16's doing


def test_loss_scale_moves_small_gradients_into_range():
    values = [1e-9] * 90 + [1e-3] * 10
    layer = precision_layer("x", hist(values), 1e-3, recommended_scale([hist(values)]))
    assert layer.fp16_flush == 0.9
    assert recommended_scale([hist(values)]) == 2.0**24  # 1e-3 · 2^24 ≈ 1.7e4 < 2^15
    assert layer.fp16_flush_scaled == 0.0


def test_recommended_scale_keeps_the_largest_gradient_below_fp16_max():
    assert recommended_scale([hist([3.0e4])]) == 1.0
    assert recommended_scale([hist([1e5])]) == 1.0  # already overflowing: never scale up
    assert recommended_scale([hist([1.0])]) == 2.0**14
    assert recommended_scale([hist([0.0])]) == 1.0


def test_large_tensors_are_sampled_and_grouped_histograms_equal_single_ones():
    big = torch.randn(SAMPLE * 4 + 3)
    assert SAMPLE * 0.75 < int(exponent_histogram(big).sum()) <= SAMPLE
    small = torch.randn(100) * 1e-6
    grouped = grouped_histograms([big, small, small], [0, 1, 1], 2)
    assert torch.equal(grouped[0], exponent_histogram(big))
    assert torch.equal(grouped[1], 2 * exponent_histogram(small))


def test_probe_histograms_cover_parameter_and_activation_gradients():
    torch.manual_seed(0)
    model = mlp(3, 16, nn.ReLU, None)
    x = torch.randn(8, 16)
    result = probe(model, Batch(args=(x,)), precision=True)
    first = result.precision[0]
    # weight 16×16 + bias 16 + the output gradient 8×16 of its one call
    assert sum(first) == 16 * 16 + 16 + 8 * 16


def test_precision_findings_are_information_for_float32_and_warnings_for_fp16():
    tiny = hist([1e-9] * 50 + [1e-20] * 50)  # wider than fp16 range: no single scale saves both
    section = precision_section(["a"], [tiny], [1e-9])
    (finding,) = precision_findings(section, half=False)
    assert finding.code == "GC013" and finding.severity.value == "info"
    (finding,) = precision_findings(section, half=True)
    assert finding.severity.value == "warning" and finding.evidence["fp16_flush"] == 1.0
    huge = precision_section(["a"], [hist([1e6] * 10)], [1e6])
    assert [f.code for f in precision_findings(huge, half=False)] == ["GC014"]


def test_fp16_underflow_example_probes_in_half_with_gradients_below_range():
    model, batch = get_example("fp16-underflow").build(0)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    result = probe(model, batch, precision=True)
    zeros = [h[0] / sum(h) for h in result.precision if sum(h)]
    assert max(zeros) > 0.3  # fp16 arithmetic already flushed a large share of the gradient to exact zeros


@pytest.mark.parametrize("entry", HEALTHY, ids=lambda z: z.name)
def test_healthy_float32_models_have_no_precision_finding(entry):
    model, batch = entry.build()
    result = probe(model, batch, precision=True)  # the forecast --autocast asks for, of the float32 pass
    names = [m.name for m in result.layers]
    section = precision_section(names, result.precision, [0.0] * len(names))
    assert precision_findings(section, half=False) == ()
