"""What a weight's entries say: the initialisation scheme its scale is closest to, and whether it still looks
like an initialisation (i.i.d. entries) or has been trained (a singular value, norm spread or mean beyond
sampling). Larger weights are reduced on evenly spaced rows and columns. Statistics and thresholds:
docs/init_audit.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

TRAINED_Z = 6.0
"""Row/column norm spread this many standard errors beyond the i.i.d. expectation: not an initialisation."""
TRAINED_SPREAD = 1.5
"""... and at least this many times the i.i.d. expectation (an effect size, for very large matrices)."""
MEAN_Z = 6.0
"""A mean this many standard errors from zero (while within ``MEAN_DRIFT``): drifted by training."""
MEAN_DRIFT = 1.0
"""A mean beyond this many stds is an offset someone chose (``uniform_(w)``: 1.73), not a drift."""
MIN_VECTORS = 8
"""Rows (or columns) needed before their norms' spread is tested."""
MIN_ENTRIES = 4
"""Entries per row (or column) needed before its norm is tested."""
SPIKE_MARGIN = 2.0
"""Trained when the top singular value exceeds the i.i.d. edge by more than this × min(rows, cols)^(-2/3)."""
MIN_SPIKE_SIDE = 4
"""Rows and columns needed before the singular-value test."""
SPARSE_SHARE = 0.25
"""Weights with more exact zeros than this (``nn.init.sparse_``, pruning) skip the singular-value test."""

SAMPLE_ENTRIES = 1 << 14
"""Larger weights are reduced on evenly spaced rows (and columns) holding about this many entries."""
HOST_BATCH = 64
"""Samples copied to the host together, at most (64 × 128 KB of float64)."""
CACHE_ENTRIES = 1 << 16
"""Entries of the samples reduced together (4 of 128 KB): batched, the ~20 reductions per weight cost one
kernel call per batch, and the temporaries stay in cache (a whole 49-weight group at once was slower than one
weight at a time; four at a time 4.3 against 7.9 ms on the MLP's 32×512 samples)."""
ORTHOGONAL_VECTORS = 64
ORTHOGONAL_ENTRIES = 1 << 22
FIRST_VECTORS = 16
"""Vectors whose norms are compared first, before the 64 of the orthogonality test are read."""
ORTHOGONAL_TOLERANCE = 0.1
"""Orthogonal when √length·max|G/c − I| is below this (i.i.d. weights give about 1 and more)."""


@dataclass(frozen=True)
class WeightStats:
    """Simple reductions of one weight (on a row sample for large ones)."""

    std: float
    """√mean(w²): the standard deviation of the zero-mean distribution an initialisation draws from."""
    constant: bool
    """Every entry the same non-zero value (``nn.init.constant_``)."""
    spread: float | None
    """Largest of (observed / i.i.d.-expected) CV of row and of column squared norms."""
    spread_z: float | None
    """That excess in standard errors of the CV estimate."""
    mean_z: float
    mean_share: float
    """|mean| / standard deviation about the mean."""
    orthogonal: bool
    entries: int
    spike: float | None = None
    """Top singular value of the centred weight over the i.i.d. edge std·(√rows + √cols)."""
    spike_limit: float = math.inf
    """Where ``spike`` stops being i.i.d. sampling for this shape."""


def weight_stats(matrix: torch.Tensor) -> WeightStats | None:
    """Moments, row/column norm spread and orthogonality; None when the sampled entries hold NaN/Inf (the probe
    reports non-finite weights itself)."""
    return weight_stats_all([matrix])[0]


def weight_stats_all(matrices: Sequence[torch.Tensor]) -> list[WeightStats | None]:
    """:func:`weight_stats` of every matrix. The samples of one shape are stacked and copied to the host at once
    (one transfer per shape from a GPU), then reduced ``CACHE_ENTRIES`` at a time (:func:`_stats`)."""
    samples = [_sample(m) for m in matrices]
    groups: dict[tuple[object, ...], list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault((tuple(sample.shape), sample.dtype, sample.device, _column_major(sample)), []).append(index)
    found: list[WeightStats | None] = [None] * len(matrices)
    chunks = [(k, group[i : i + HOST_BATCH]) for k, group in groups.items() for i in range(0, len(group), HOST_BATCH)]
    for (_, dtype, _, column_major), indices in chunks:
        if column_major:  # copied as laid out (a transposed Conv1D weight), so every sum runs in the same order
            stacked = torch.stack([samples[i].t() for i in indices]).transpose(1, 2)
        else:
            stacked = torch.stack([samples[i] for i in indices])
        host = stacked.to(device="cpu", dtype=torch.float64)
        per_batch = max(1, CACHE_ENTRIES // host[0].numel())
        for start in range(0, len(indices), per_batch):
            batch = indices[start : start + per_batch]
            every = _stats(host[start : start + per_batch], wide=dtype == torch.float64)
            for index, stats in zip(batch, every, strict=True):
                if stats is not None and not stats.constant and stats.std > 0.0:
                    stats = replace(stats, orthogonal=_orthogonal(matrices[index]))
                found[index] = stats
    return found


def _column_major(matrix: torch.Tensor) -> bool:
    """Whether the matrix is laid out column by column (a transpose), which a copy to the host would keep."""
    rows, cols = matrix.shape
    return rows > 1 and cols > 1 and matrix.stride() == (1, rows)


def _sample(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix, or for larger weights its evenly spaced rows (and columns) holding about ``SAMPLE_ENTRIES``."""
    rows, cols = matrix.shape
    sample = matrix
    if rows * cols > SAMPLE_ENTRIES:
        width = min(cols, SAMPLE_ENTRIES // MIN_VECTORS)
        keep = max(MIN_VECTORS, SAMPLE_ENTRIES // width)
        if rows > keep and _column_major(matrix):  # gathered along the memory layout (a transposed Conv1D weight:
            # 90 → 20 µs for GPT-2's 768×2304), then laid out as a row gather leaves it
            sample = sample.t().index_select(1, _evenly(rows, keep, matrix.device)).t().contiguous()
        elif rows > keep:  # rows first: the column gather then touches only the kept rows
            sample = sample.index_select(0, _evenly(rows, keep, matrix.device))
        if cols > width:
            sample = sample.index_select(1, _evenly(cols, width, matrix.device))
    return sample


def _stats(x: torch.Tensor, wide: bool) -> list[WeightStats | None]:
    """The statistics of a batch of float64 samples of one shape on the host, (count, rows, cols) (orthogonality is
    asked of each whole matrix apart); ``wide``: the weights were float64 themselves, so their squares may
    overflow. Every reduction runs over the batch at once: ~20 small kernels per batch instead of per weight
    (``CACHE_ENTRIES`` keeps a batch's temporaries in cache)."""
    count, rows, cols = x.shape
    entries = rows * cols
    squares = x.square()
    row_norms, col_norms = squares.sum(dim=2), squares.sum(dim=1)
    flat_squares = squares.reshape(count, entries)
    second = flat_squares.sum(dim=1) / entries
    mean = x.reshape(count, entries).sum(dim=1) / entries
    # an entry narrower than float64, squared, cannot overflow: the sum of squares is finite iff every entry is
    finite = torch.isfinite(x).reshape(count, entries).all(dim=1) if wide else torch.isfinite(second)
    deviation = x - mean[:, None, None]
    flat_deviation = deviation.reshape(count, entries)
    row_std, row_centre = torch.std_mean(row_norms, dim=1) if rows > 1 else (second, row_norms.mean(dim=1))
    col_std, col_centre = torch.std_mean(col_norms, dim=1) if cols > 1 else (second, col_norms.mean(dim=1))
    reductions = [
        finite.double(),
        mean,
        second,
        torch.linalg.vecdot(flat_squares, flat_squares) / entries,
        torch.linalg.vecdot(flat_deviation, flat_deviation) / entries,
        row_centre,
        row_std,
        col_centre,
        col_std,
        (entries - torch.count_nonzero(x.reshape(count, entries), dim=1)).double(),
    ]
    values = torch.stack(reductions, dim=1).tolist()
    tops = _top_singular(deviation) if min(rows, cols) >= MIN_SPIKE_SIDE else [math.nan] * count
    return [_judged(v, top, rows, cols) for v, top in zip(values, tops, strict=True)]


def _judged(values: list[float], top: float, rows: int, cols: int) -> WeightStats | None:
    """One sample's :class:`WeightStats` from its reductions (in :func:`_stats`' order) and its top singular value."""
    ok, mean_, second_, fourth, about, row_centre, row_std, col_centre, col_std, zeros = values
    if not ok:
        return None
    entries = rows * cols
    rms = math.sqrt(second_)
    std = math.sqrt(about)  # about the mean: exactly 0 for a constant
    if rms == 0.0 or (entries > 1 and std <= 1e-12 * rms):
        return WeightStats(rms, rms > 0.0, None, None, 0.0, math.inf, False, entries)
    kurtosis = fourth / (second_ * second_)
    tests = [_spread(row_centre, row_std, rows, cols, kurtosis), _spread(col_centre, col_std, cols, rows, kurtosis)]
    valid = [t for t in tests if t is not None]
    spread = max((t[0] for t in valid), default=None)
    spread_z = max((t[1] for t in valid), default=None)
    mean_z = abs(mean_) * math.sqrt(entries) / math.sqrt(second_)  # ≤ √entries: tiny weights cannot trip it
    spike, limit = None, math.inf
    if std > 0.0 and zeros / entries < SPARSE_SHARE and min(rows, cols) >= MIN_SPIKE_SIDE:
        spike = top / (std * (math.sqrt(rows) + math.sqrt(cols)))
        limit = 1.0 + SPIKE_MARGIN * min(rows, cols) ** (-2.0 / 3.0)
    share = abs(mean_) / std if std > 0.0 else math.inf
    return WeightStats(rms, False, spread, spread_z, mean_z, share, False, entries, spike, limit)


def _top_singular(centred: torch.Tensor) -> list[float]:
    """The largest singular value of each matrix of a batch, exactly: √ of the top eigenvalue of its Gram matrix on
    the shorter side (float64); inf where that Gram matrix overflows."""
    short = centred if centred.shape[1] <= centred.shape[2] else centred.transpose(1, 2)
    gram = short @ short.transpose(1, 2)
    finite = torch.isfinite(gram).flatten(1).all(dim=1)
    top = torch.linalg.eigvalsh(torch.where(finite[:, None, None], gram, 0.0))[:, -1]
    return [math.sqrt(max(0.0, t)) if ok else math.inf for t, ok in zip(top.tolist(), finite.tolist(), strict=True)]


def _evenly(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """``k`` evenly spaced distinct indices in ``range(n)``."""
    return (torch.arange(k, device=device) * n) // k


def _spread(centre: float, std: float, count: int, per: int, kurtosis: float) -> tuple[float, float] | None:
    """(observed / expected CV of ``count`` squared norms, its excess in standard errors) for i.i.d. entries, from
    the norms' mean ``centre`` and standard deviation ``std``.

    ``per`` i.i.d. entries with kurtosis κ (about zero) give squared norms with CV √((κ−1)/per); the CV of
    ``count`` such norms is estimated within about 1/√(2(count−1)) of itself (more for few entries per norm).
    """
    if count < MIN_VECTORS or per < MIN_ENTRIES or kurtosis <= 1.0 + 1e-9:
        return None
    if centre <= 0:
        return None
    observed = std / centre
    expected = math.sqrt((kurtosis - 1.0) / per)
    ratio = observed / expected
    z = (ratio - 1.0) * math.sqrt(2.0 * (count - 1)) / math.sqrt(1.0 + 6.0 / per)
    return ratio, z


def _orthogonal(matrix: torch.Tensor) -> bool:
    """Whether the shorter side's vectors are orthogonal and of equal norm (W Wᵀ ∝ I), on up to 64 of them."""
    vectors = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.t()
    count, length = vectors.shape
    if count < 2:
        return False
    keep = min(count, ORTHOGONAL_VECTORS)
    if keep * length > ORTHOGONAL_ENTRIES:
        return False
    if vectors.stride(1) == 1 or length == 1:  # each vector contiguous: evenly spaced ones cost only themselves
        index = _evenly(count, keep, vectors.device)
        if _norms_spread(vectors.index_select(0, index[:FIRST_VECTORS])):
            return False
        chosen = vectors.index_select(0, index)
    else:  # vectors across the memory layout (a tall weight's columns): a block of neighbours reads a slice of
        # each row, where evenly spaced ones touch every cache line (GPT-2's tied 50257×768 lm_head)
        chosen = vectors.narrow(0, 0, keep)
        if _norms_spread(chosen.narrow(0, 0, min(keep, FIRST_VECTORS))):
            return False
    a = chosen.to(device="cpu", dtype=torch.float32)
    if _norms_unequal(a):
        return False
    gram = (a @ a.t()).double()  # float32 products are far inside the 0.1/√length tolerance
    scale = float(gram.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        return False
    deviation = float((gram / scale - torch.eye(keep, dtype=torch.float64)).abs().max())
    return deviation * math.sqrt(length) < ORTHOGONAL_TOLERANCE


def _norms_spread(first: torch.Tensor) -> bool:
    """Whether the first of :func:`_orthogonal`'s vectors already fail its test by their norms alone: 16 vectors
    read instead of 64 (in a tall row-major weight, one cache line of each row), which is where i.i.d. weights
    stop (their norms² spread by √(2/length), ≥ 6× the tolerance).

    The test fails when a diagonal entry of the float32 Gram matrix, over the mean of the diagonal, is off 1 by
    t = 0.1/√length or more. Two entries in the ratio ρ cannot both be within t of 1 for any mean when
    ρ > (1 + t)/(1 − t); each float32 entry is within γ = n·2⁻²⁴/(1 − n·2⁻²⁴) of its exact value, so an exact
    ratio of the largest to the smallest above that bound × (1 + γ)/(1 − γ) fails the test whatever the rounding.
    """
    norms = _squared_norms(first)
    low, high = min(norms), max(norms)
    if not (math.isfinite(high) and low > 0):
        return False  # the full test decides
    unit, t = _rounding_and_tolerance(first.shape[1])
    gamma = unit / (1.0 - unit)
    return high / low * (1.0 - gamma) / (1.0 + gamma) > (1.0 + t) / (1.0 - t) * (1.0 + 1e-12)


def _norms_unequal(a: torch.Tensor) -> bool:
    """Whether the vectors' norms alone already fail :func:`_orthogonal`'s test (the Gram matrix's diagonal),
    whatever the rounding of the float32 Gram matrix: i.i.d. weights stop here without the full product.

    Each diagonal entry of the float32 Gram matrix is within γ = n·2⁻²⁴/(1 − n·2⁻²⁴) of the exact squared norm
    (n = length), and their mean too, so an entry whose exact ratio to the mean is r deviates from 1 there by at
    least |r − 1| − 2.1·γ·r; one such deviation beyond the tolerance fails the test.
    """
    norms = _squared_norms(a)
    scale = sum(norms) / len(norms)
    if not math.isfinite(scale) or scale <= 0:
        return False  # the full test decides
    unit, bound = _rounding_and_tolerance(a.shape[1])
    slack = 2.1 * unit / (1.0 - unit)
    return any(abs(r - 1.0) - slack * r > bound for r in (n / scale for n in norms))


def _squared_norms(vectors: torch.Tensor) -> list[float]:
    """Each vector's exact squared norm after rounding to float32, as the Gram test's product sees it."""
    return vectors.to(device="cpu", dtype=torch.float32).double().square().sum(dim=1).tolist()


def _rounding_and_tolerance(length: int) -> tuple[float, float]:
    """(n·2⁻²⁴ for vectors of ``length`` n, the float32 dot product's relative rounding; t = 0.1/√n with a margin for
    the test's own float64 arithmetic): what the norm prefilters of :func:`_orthogonal` bound the Gram test by."""
    return length * 2.0**-24, ORTHOGONAL_TOLERANCE / math.sqrt(length) * (1.0 + 1e-9) + 1e-12


def looks_like(stats: WeightStats, fan_in: int, fan_out: int, gain: float, hidden: int | None) -> str:
    """The known scheme whose std is nearest in log distance, within sampling tolerance; else ``unknown``."""
    if stats.std == 0.0:
        return "zeros"
    if stats.constant:
        return "constant"
    if stats.orthogonal:
        return "orthogonal"
    candidates = [("pytorch_default", 1.0 / math.sqrt(3.0 * (hidden or fan_in))), ("kaiming", math.sqrt(2.0 / fan_in))]
    if not (math.isclose(gain, 1.0) or math.isclose(gain, math.sqrt(2.0))):
        candidates.append(("kaiming", gain / math.sqrt(fan_in)))
    if fan_out != fan_in:
        candidates.append(("kaiming_fan_out", math.sqrt(2.0 / fan_out)))
    xavier = math.sqrt(2.0 / (fan_in + fan_out))
    candidates.append(("xavier", xavier))
    if not math.isclose(gain, 1.0):
        candidates.append(("xavier", gain * xavier))
    candidates += [("lecun", 1.0 / math.sqrt(fan_in)), ("normal_0.02", 0.02)]
    # nearest first; exact ties (Xavier and LeCun on square layers) go to the earlier entry
    distances = [round(abs(math.log(stats.std / std)), 9) for _, std in candidates]
    best = distances.index(min(distances))
    tolerance = math.log(1.15) + 3.0 / math.sqrt(2.0 * stats.entries)
    return candidates[best][0] if distances[best] < tolerance else "unknown"


def trained_evidence(stats: WeightStats) -> str | None:
    """Why the weight no longer looks like an initialisation, or None."""
    if stats.spike is not None and stats.spike > stats.spike_limit:
        return f"top singular value {stats.spike:.3g}× the i.i.d. edge"
    spread, z = stats.spread, stats.spread_z
    if spread is not None and z is not None and z > TRAINED_Z and spread > TRAINED_SPREAD:
        return f"row/column norms spread {stats.spread:.3g}× the i.i.d. expectation"
    if stats.mean_z > MEAN_Z and stats.mean_share <= MEAN_DRIFT:
        return f"mean {stats.mean_share:.2g} std from zero"
    return None
