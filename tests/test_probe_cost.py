"""The cheaper paths of the probe and the init audit give the numbers the plain ones give, bit for bit.

No timing here (BENCHMARKS.md holds the numbers): each test pins that a fused or batched reduction is the same
value as the per-tensor one it replaced, NaN and Inf included.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcheck_cli.diagnose import weight_statistics as ws
from gradcheck_cli.diagnose.weight_statistics import WeightStats, weight_stats, weight_stats_all
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.activations import ActivationRecorder, derivative, saturation_limit, unit_peaks
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.probe.norms import _blas_norm, l2_norms, max_abs, norm_and_max_abs, norms_and_max_abs
from gradcheck_cli.probe.precision import BINS, NON_FINITE_BIN, OFFSET, ZERO_BIN, grouped_histograms, sample
from gradcheck_cli.probe.readout import to_host

NAN, INF = math.nan, math.inf


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_fused_gradient_norms_equal_the_per_tensor_ones() -> None:
    torch.manual_seed(0)
    tensors = [
        torch.randn(300, 7),
        torch.tensor([1.0, NAN, -3.0]),
        torch.tensor([NAN, INF]),
        torch.tensor([-INF, 2.0]),
        torch.tensor([-0.0, 0.0]),
        torch.tensor([2.0, 1.0, NAN]),
        torch.tensor([-INF, NAN, 1.0]),
        torch.zeros(0),
        torch.randn(50, dtype=torch.float16),
        torch.randn(50, dtype=torch.bfloat16),
        torch.randn(9, dtype=torch.float64),
        torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([3.0, -4.0]), (5,)),
    ]
    for t, (l2, peak) in zip(tensors, norms_and_max_abs(tensors), strict=True):
        ref_l2, ref_peak = norm_and_max_abs(t)
        assert l2.dtype == ref_l2.dtype
        assert _same(float(l2), float(ref_l2)) and _same(float(peak), float(ref_peak))
        dense = t.coalesce().values() if t.is_sparse else t
        if dense.numel():  # max |element| as aminmax gives it, NaN propagated wherever it sits
            low, high = torch.aminmax(dense)
            assert _same(float(peak), float(torch.maximum(high, low.neg())))
            assert _same(float(max_abs(t)), float(peak))


def test_blas_norms_are_the_float64_norm_with_nan_inf_and_overflow_as_vector_norm() -> None:
    """√(v·v) through BLAS: within float32 rounding of the exact (float64) norm, non-contiguous and small
    tensors through ``_foreach_norm``; NaN, Inf and float32 overflow read as ``vector_norm`` reads them."""
    torch.manual_seed(6)
    big = torch.randn(4, 64, 56, 56)
    nan, inf = torch.randn(10_000), torch.randn(10_000)
    nan[77], inf[5] = NAN, -INF
    tensors = [big, big.transpose(1, 3), torch.randn(300), torch.randn(5000, dtype=torch.float64) * 1e200, nan, inf,
               torch.full((8192,), 1e20), torch.zeros(4096)]  # fmt: skip
    for tensor, norm in zip(tensors, l2_norms(tensors), strict=True):
        exact = float(torch.linalg.vector_norm(tensor.double()))
        plain = float(torch.linalg.vector_norm(tensor))
        if math.isfinite(plain):
            assert float(norm) == pytest.approx(exact, rel=2e-5)
        else:  # the same NaN/Inf, and the same overflow beyond float32's range (1e20² per element)
            assert _same(float(norm), plain)
    assert _blas_norm(big) and not _blas_norm(big.transpose(1, 3)) and not _blas_norm(torch.randn(300))


def test_one_host_copy_keeps_order_and_values_across_dtypes() -> None:
    tensors = [
        torch.tensor(1.5),
        torch.tensor([7, 2**40], dtype=torch.int64),
        torch.tensor(NAN, dtype=torch.float64),
        torch.tensor([0.1, -2.0], dtype=torch.float16),
        torch.zeros(0),
        torch.tensor(1e-30),
    ]
    half, tiny = float(torch.tensor(0.1, dtype=torch.float16)), float(torch.tensor(1e-30))
    expected = [1.5, 7.0, float(2**40), NAN, half, -2.0, tiny]
    got = to_host(tensors)
    assert len(got) == len(expected) and all(_same(a, b) for a, b in zip(got, expected, strict=True))


def test_grouped_histogram_bins_zero_non_finite_and_exponents() -> None:
    values = torch.tensor([0.0, -0.0, NAN, INF, -INF, 1.0, 0.75, 3.0, 2.0**-149, 2.0**-130, 1e38])
    hist = grouped_histograms([values, torch.tensor([0.5, 0.0])], [1, 0], 2)
    assert hist.shape == (2, BINS) and int(hist.sum()) == values.numel() + 2
    assert hist[1, ZERO_BIN] == 2 and hist[1, NON_FINITE_BIN] == 3
    assert hist[1, OFFSET + 1] == 1  # 1.0 = 0.5·2¹
    assert hist[1, OFFSET + 0] == 1  # 0.75 = 0.75·2⁰
    assert hist[1, OFFSET + 2] == 1  # 3.0
    assert hist[1, OFFSET - 148] == 1 and hist[1, OFFSET - 129] == 1  # float32 subnormals keep their exponent
    assert hist[0, ZERO_BIN] == 1 and hist[0, OFFSET] == 1


def test_histograms_binned_in_batches_equal_each_tensor_alone() -> None:
    """More sampled elements than one batch holds (``CHUNK``), groups spanning a batch boundary, mixed dtypes:
    the counts are each tensor's own histogram, summed per group."""
    from gradcheck_cli.probe.precision import CHUNK, exponent_histogram

    torch.manual_seed(7)
    tensors = [torch.randn(300, 300) * 10.0 ** (i % 7 - 3) for i in range(80)]
    tensors += [torch.randn(5000, dtype=torch.float64), torch.tensor([NAN, INF, 0.0, 1e-45])]
    groups = [i % 5 for i in range(len(tensors))]
    assert sum(min(t.numel(), 4096) for t in tensors) > 2 * CHUNK
    expected = torch.zeros((5, BINS), dtype=torch.int64)
    for tensor, group in zip(tensors, groups, strict=True):
        expected[group] += exponent_histogram(tensor)
    assert torch.equal(grouped_histograms(tensors, groups, 5), expected)


def _matrices() -> list[torch.Tensor]:
    torch.manual_seed(1)
    orthogonal = torch.empty(96, 96)
    nn.init.orthogonal_(orthogonal)
    sparse = torch.randn(60, 60)
    sparse[sparse.abs() < 1.0] = 0.0
    with_nan = torch.randn(20, 20)
    with_nan[3, 4] = NAN
    spiked = torch.randn(64, 64)
    spiked[0] *= 40.0
    return [
        torch.randn(512, 512) * 0.04,
        torch.randn(512, 512) * 0.04,
        torch.randn(10, 512),
        torch.randn(768, 2304) * 0.02,
        torch.randn(64, 147),
        torch.randn(2304, 768).t(),  # Hugging Face Conv1D: stored transposed
        torch.randn(40, 40).t(),  # small enough to be taken whole, column by column
        orthogonal,
        orthogonal * 3.0,
        torch.eye(32),
        torch.zeros(16, 16),
        torch.full((16, 16), 0.5),
        sparse,
        with_nan,
        spiked,
        torch.randn(40, 40, dtype=torch.float16),
        torch.randn(30, 50, dtype=torch.float64),
        torch.randn(1, 9),
        torch.randn(3, 3),
    ]


def _fields(stats: WeightStats | None) -> tuple[object, ...] | None:
    if stats is None:
        return None
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in stats.__dict__.values())


def test_weight_statistics_of_many_weights_equal_one_at_a_time() -> None:
    """Reduced in batches of four, a weight's statistics are its own: the same as alone, to the rounding of a
    batched matrix product (the top singular value: 1e-16 relative)."""
    matrices = _matrices()
    together = weight_stats_all(matrices)
    for matrix, stats in zip(matrices, together, strict=True):
        alone = _fields(weight_stats(matrix.clone() if matrix.is_contiguous() else matrix))
        both = _fields(stats)
        assert (both is None) == (alone is None)
        for a, b in zip(both or (), alone or (), strict=True):
            assert a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-12))


@pytest.mark.parametrize("shape", [(96, 96), (64, 200), (200, 64), (8, 3000)])
def test_orthogonal_weights_pass_the_norm_prefilter(shape: tuple[int, int]) -> None:
    weight = torch.empty(*shape)
    nn.init.orthogonal_(weight, gain=2.0)
    stats = weight_stats(weight)
    assert stats is not None and stats.orthogonal
    noisy = weight + 0.05 * weight.std() * torch.randn(*shape)
    noisy_stats = weight_stats(noisy)
    assert noisy_stats is not None and not noisy_stats.orthogonal


@pytest.mark.parametrize("stored", [(768, 2304), (3072, 768), (700, 90)])
def test_a_transposed_weight_is_sampled_as_a_plain_row_gather(stored: tuple[int, int]) -> None:
    """Hugging Face's Conv1D weight, seen as (out, in), is gathered along its memory layout: the same values and
    layout as ``index_select`` over its rows."""
    matrix = torch.randn(*stored).t()
    rows, cols = matrix.shape
    width = min(cols, ws.SAMPLE_ENTRIES // ws.MIN_VECTORS)
    keep = max(ws.MIN_VECTORS, ws.SAMPLE_ENTRIES // width)
    expected = matrix.index_select(0, (torch.arange(keep) * rows) // keep) if rows > keep else matrix
    if cols > width:
        expected = expected.index_select(1, (torch.arange(width) * cols) // width)
    got = ws._sample(matrix)
    assert torch.equal(got, expected) and got.stride() == expected.stride()


def _gram_test(matrix: torch.Tensor) -> bool:
    """The orthogonality test without any prefilter: the 64 vectors' float32 Gram matrix against the identity."""
    vectors = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.t()
    count, length = vectors.shape
    keep = min(count, ws.ORTHOGONAL_VECTORS)
    if vectors.stride(1) == 1 or length == 1:
        chosen = vectors.index_select(0, (torch.arange(keep) * count) // keep)
    else:
        chosen = vectors.narrow(0, 0, keep)
    a = chosen.float()
    gram = (a @ a.t()).double()
    scale = float(gram.diagonal().mean())
    deviation = float((gram / scale - torch.eye(keep, dtype=torch.float64)).abs().max())
    return deviation * math.sqrt(length) < ws.ORTHOGONAL_TOLERANCE


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (300, 40), (2000, 48), (12, 700)])
def test_the_norm_prefilters_reject_only_what_the_gram_test_rejects(shape: tuple[int, int]) -> None:
    """Orthogonal weights with noise from far inside to far beyond the tolerance: the test with its two norm
    prefilters (16 vectors, then 64) decides as the Gram matrix alone does, on row- and column-major layouts."""
    torch.manual_seed(3)
    base = torch.empty(*shape)
    nn.init.orthogonal_(base)
    length = max(shape)
    decided = []
    for noise in (0.0, 1e-4, 0.01, 0.03, 0.05, 0.08, 0.1, 0.15, 0.3, 1.0):
        for layout in (base, base.t().contiguous().t()):
            weight = layout + noise / math.sqrt(length) * base.std() * torch.randn(*shape)
            expected = _gram_test(weight)
            assert ws._orthogonal(weight) == expected, (noise, weight.stride())
            decided.append(expected)
    assert any(decided) and not all(decided)  # both sides of the tolerance were tried


def test_activation_statistics_read_back_in_call_order() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Hardtanh())
    x = torch.randn(64, 8) * 3.0
    with ActivationRecorder(model) as recorder:
        model(x)
        model(x * 0.1)
    tensors = recorder.device_tensors()
    totals = recorder.summarise(to_host(tensors))
    assert [t.type for t in totals] == ["Tanh", "ReLU", "Hardtanh"]
    assert all(t.calls == 2 for t in totals)
    per_call = [(c.module, float(c.derivative_sq)) for c in recorder.calls]
    for index, total in enumerate(totals):
        assert total.derivative_sq == pytest.approx(sum(d for m, d in per_call if m == index), rel=1e-12)
    assert totals[0].saturated is not None and totals[1].dead is not None and totals[2].saturated is not None
    assert totals[1].saturated is None and totals[0].dead is None


@pytest.mark.parametrize(
    ("shape", "unit_dim"),
    [((4, 8, 5, 5), 1), ((4, 8, 5, 5, 3), 1), ((6, 7, 9), 1), ((6, 7, 9), 2), ((32, 16), 1), ((3, 5, 7), 0)],
)
def test_unit_peaks_are_the_max_over_every_other_dimension(shape: tuple[int, ...], unit_dim: int) -> None:
    torch.manual_seed(4)
    z = torch.randn(*shape)
    z.view(-1)[5] = NAN  # a NaN reaches its unit's peak as amax gives it
    for tensor in (z, z.transpose(0, -1).contiguous().transpose(0, -1)):  # and a non-contiguous layout
        expected = torch.amax(tensor, dim=[d for d in range(tensor.dim()) if d != unit_dim])
        assert torch.equal(unit_peaks(tensor, unit_dim).nan_to_num(7.0), expected.nan_to_num(7.0))


def test_activation_sums_reduced_by_kind_equal_each_call_alone() -> None:
    """φ'(z)² sums and saturated counts reduced per kind at the end (LeakyReLUs of two slopes apart, a loop of
    300 calls flushed as it goes) equal each call's own sums over its sample."""
    torch.manual_seed(5)
    acts = [nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1), nn.LeakyReLU(0.3), nn.Hardtanh(-2.0, 2.0), nn.ReLU(), nn.ELU()]
    model = nn.Sequential(*[m for act in acts for m in (nn.Linear(64, 64), act)])
    x = torch.randn(100, 64) * 3.0
    expected: list[tuple[float, float | None]] = []
    with ActivationRecorder(model) as recorder:
        for _ in range(300 // len(acts) + 1):
            z = x
            for layer, act in zip(model[::2], acts, strict=True):
                z = layer(z)
                part = sample(z.detach())
                slope = derivative(type(act).__name__, part, act)
                limit = saturation_limit(type(act).__name__)
                saturated = (
                    (part.abs() > limit).sum()
                    if limit
                    else (slope == 0).sum()
                    if isinstance(act, nn.Hardtanh)
                    else None
                )
                expected.append((float(slope.square().sum()), None if saturated is None else float(saturated)))
                z = act(z)
        recorder.device_tensors()
    assert len(recorder.calls) == len(expected) > 256
    for call, (derivative_sq, saturated) in zip(recorder.calls, expected, strict=True):
        assert float(call.derivative_sq) == pytest.approx(derivative_sq, rel=1e-5)
        assert (None if call.saturated is None else float(call.saturated)) == saturated


def test_an_fp16_gradient_norm_beyond_65504_is_finite() -> None:
    """Every element is finite (300), so the norm (3e5) is too: taken as float32, never as fp16's inf."""
    from gradcheck_cli.probe.norms import norm_and_max_abs, norms_and_max_abs

    grad = torch.full((1_000_000,), 300.0, dtype=torch.float16)
    assert torch.isinf(torch.linalg.vector_norm(grad))  # what fp16 would read
    for norm, peak in (norm_and_max_abs(grad), *norms_and_max_abs([grad, torch.ones(3)])[:1]):
        assert float(norm) == pytest.approx(3e5, rel=1e-3) and float(peak) == 300.0


@pytest.mark.parametrize("width", [8, 64])  # below and at the BLAS norm's size
def test_a_gradient_maximum_is_read_only_where_its_norm_is_non_finite(width: int) -> None:
    """Without the half-precision forecast the probe skips each parameter gradient's max |g| (a pass over every
    gradient), since a finite norm already says every element is finite; where the norm is Inf or NaN the max is
    read, so a sum of squares beyond float32's range is told from an Inf or NaN element."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width, bias=False), nn.Linear(width, width))
    x, target = torch.randn(16, width), torch.zeros(16, width)
    healthy = probe(model, Batch(args=(x,), target=target))
    assert all(m.grad is not None and m.grad.max_abs is None and m.grad.finite for m in healthy.layers)
    forecast = probe(model, Batch(args=(x,), target=target), precision=True)
    assert all(m.grad is not None and m.grad.max_abs is not None for m in forecast.layers)
    assert [m.grad.l2 for m in healthy.layers if m.grad] == [m.grad.l2 for m in forecast.layers if m.grad]

    huge = probe(model, Batch(args=(x * 1e12,), target=target))  # elements ~1e22: their squares overflow float32
    first = huge.layers[0].grad
    assert first is not None and math.isinf(first.l2) and first.max_abs is not None
    assert math.isfinite(first.max_abs) and first.finite
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    broken = probe(model, Batch(args=(x,), target=target)).layers[0].grad
    assert broken is not None and math.isnan(broken.l2) and broken.max_abs is not None and not broken.finite
