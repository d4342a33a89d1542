"""What a weight's entries say: the initialisation scheme its scale is closest to, and whether it still looks
like an initialisation (i.i.d. entries) or has been trained (a singular value, norm spread or mean beyond
sampling). Larger weights are reduced on evenly spaced rows and columns. Statistics and thresholds:
docs/init_audit.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
SPIKE_ENTRIES = 1 << 14
"""The singular-value test runs on evenly spaced rows holding about this many entries."""

SAMPLE_ENTRIES = 1 << 14
"""Larger weights are reduced on evenly spaced rows (and columns) holding about this many entries."""
ORTHOGONAL_VECTORS = 64
ORTHOGONAL_ENTRIES = 1 << 22
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
    rows, cols = matrix.shape
    sample = matrix
    if rows * cols > SAMPLE_ENTRIES:
        width = min(cols, SAMPLE_ENTRIES // MIN_VECTORS)
        keep = max(MIN_VECTORS, SAMPLE_ENTRIES // width)
        if rows > keep:  # rows first: the column gather then touches only the kept rows
            sample = sample[_evenly(rows, keep, matrix.device)]
        if cols > width:
            sample = sample[:, _evenly(cols, width, matrix.device)]
    x = sample.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        return None
    squares = x.square()
    entries = x.numel()
    mean = float(x.mean())
    second = float(squares.mean())
    fourth = float(squares.square().mean())
    rms = math.sqrt(second)
    std = math.sqrt(float((x - mean).square().mean()))  # about the mean: exactly 0 for a constant
    if rms == 0.0 or (entries > 1 and std <= 1e-12 * rms):
        return WeightStats(rms, rms > 0.0, None, None, 0.0, math.inf, False, entries)
    kurtosis = fourth / (second * second)
    tests = [
        _spread(squares.sum(dim=1), x.shape[1], kurtosis),
        _spread(squares.sum(dim=0), x.shape[0], kurtosis),
    ]
    valid = [t for t in tests if t is not None]
    spread = max((t[0] for t in valid), default=None)
    spread_z = max((t[1] for t in valid), default=None)
    mean_z = abs(mean) * math.sqrt(entries) / math.sqrt(second)  # ≤ √entries: tiny weights cannot trip it
    spike, limit = None, math.inf
    if std > 0.0 and float((x == 0).double().mean()) < SPARSE_SHARE:
        centred = x if entries <= SPIKE_ENTRIES else x[_evenly(x.shape[0], max(1, SPIKE_ENTRIES // x.shape[1]))]
        side = min(centred.shape)
        if side >= MIN_SPIKE_SIDE:
            top = _top_singular((centred - mean).float())
            spike = top / (std * (math.sqrt(centred.shape[0]) + math.sqrt(centred.shape[1])))
            limit = 1.0 + SPIKE_MARGIN * side ** (-2.0 / 3.0)
    share = abs(mean) / std if std > 0.0 else math.inf
    return WeightStats(rms, False, spread, spread_z, mean_z, share, _orthogonal(matrix), entries, spike, limit)


def _top_singular(x: torch.Tensor) -> float:
    """The largest singular value, exactly: √ of the top eigenvalue of the Gram matrix on the shorter side."""
    short = (x if x.shape[0] <= x.shape[1] else x.t()).double()
    gram = short @ short.t()
    if not bool(torch.isfinite(gram).all()):
        return math.inf
    return math.sqrt(max(0.0, float(torch.linalg.eigvalsh(gram)[-1])))


def _evenly(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """``k`` evenly spaced distinct indices in ``range(n)``."""
    return (torch.arange(k, device=device) * n) // k


def _spread(squared_norms: torch.Tensor, per: int, kurtosis: float) -> tuple[float, float] | None:
    """(observed / expected CV of the squared norms, its excess in standard errors) for i.i.d. entries.

    ``per`` i.i.d. entries with kurtosis κ (about zero) give squared norms with CV √((κ−1)/per); the CV of
    ``count`` such norms is estimated within about 1/√(2(count−1)) of itself (more for few entries per norm).
    """
    count = squared_norms.numel()
    if count < MIN_VECTORS or per < MIN_ENTRIES or kurtosis <= 1.0 + 1e-9:
        return None
    centre = float(squared_norms.mean())
    if centre <= 0:
        return None
    observed = float(squared_norms.std()) / centre
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
    a = vectors[_evenly(count, keep, vectors.device)].to(device="cpu", dtype=torch.float32)
    gram = (a @ a.t()).double()  # float32 products are far inside the 0.1/√length tolerance
    scale = float(gram.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        return False
    deviation = float((gram / scale - torch.eye(keep, dtype=torch.float64)).abs().max())
    return deviation * math.sqrt(length) < ORTHOGONAL_TOLERANCE


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
