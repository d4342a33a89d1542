"""What half precision would do to the gradients: a base-2 exponent histogram per layer.

Each gradient tensor (every activation-gradient call and every parameter gradient) contributes
the histogram of ``frexp`` exponents of at most :data:`SAMPLE` evenly strided elements, reduced on
the device. From it any threshold is a prefix sum on the host: the share that fp16 rounds to 0
(|g| < 2⁻²⁵ ≈ 2.98e-8, half its smallest subnormal 5.96e-8), keeps only as subnormal (< 2⁻¹⁴ ≈
6.10e-5) or overflows (≥ 2¹⁶ > 65504), what bf16 rounds to 0 (< 2⁻¹³⁴), and the same after a loss
scale of 2^s, for any s. The report's section and the GC013/GC014 findings are built from these in
diagnose/precision.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SAMPLE = 4096
"""Elements examined per tensor: a strided sample estimates a share to within about ±1.5 % (2σ at 50 %)."""
BINS = 300
ZERO_BIN, NON_FINITE_BIN, OFFSET = 0, 1, 150
FP16_FLUSH_EXP = -25
"""|g| = m·2^e with m ∈ [0.5, 1): e ≤ −25 means |g| < 2⁻²⁵, half of fp16's smallest subnormal, so it rounds to 0."""
FP16_SUBNORMAL_EXP = -14
FP16_OVERFLOW_EXP = 17
"""e ≥ 17 means |g| ≥ 2¹⁶, beyond fp16's largest value 65504."""
BF16_FLUSH_EXP = -134
MAX_SCALE_EXP = 24
HEADROOM_EXP = 15
"""The recommended scale keeps the largest gradient below 2¹⁵, one binade under fp16's maximum."""


def sample(tensor: torch.Tensor) -> torch.Tensor:
    """At most :data:`SAMPLE` evenly strided elements of ``tensor``, flat, as float32 or float64."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[:: -(-flat.numel() // SAMPLE)]  # a stride that spans the whole tensor
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def _bins(flat: torch.Tensor) -> torch.Tensor:
    """Each element's bin (int32): zero, non-finite, or its ``frexp`` exponent offset and clamped into range.
    ``flat`` is the caller's own copy: it is overwritten (fewer fresh buffers: each costs page faults on a CPU)."""
    magnitude = flat.abs_()
    zero = magnitude == 0
    non_finite = (magnitude < math.inf).logical_not_()  # NaN compares false: non-finite too
    exponent = torch.empty(magnitude.shape, dtype=torch.int32, device=magnitude.device)
    torch.frexp(magnitude, out=(magnitude, exponent))
    index = exponent.add_(OFFSET).clamp_(NON_FINITE_BIN + 1, BINS - 1)
    return index.masked_fill_(zero, ZERO_BIN).masked_fill_(non_finite, NON_FINITE_BIN)


def exponent_histogram(tensor: torch.Tensor) -> torch.Tensor:
    """Counts of zero, non-finite and each base-2 exponent among a strided sample (int64, on the device)."""
    return torch.bincount(_bins(sample(tensor).clone()), minlength=BINS)


CHUNK = 1 << 17
"""Sampled elements binned together at most: the temporaries of one batch stay near 1.5 MB while every gradient
is still alive (an MLP's 150 samples binned at once raised its peak memory 11 % above a bare pass)."""


def grouped_histograms(tensors: Sequence[torch.Tensor], groups: Sequence[int], count: int) -> torch.Tensor:
    """One histogram per group (``count`` × :data:`BINS`) over many tensors of one device, in a few kernels: the
    samples joined group by group (counts do not depend on the order) in batches of at most :data:`CHUNK`
    elements, each group's bins moved to its own row."""
    order = sorted(range(len(tensors)), key=lambda i: groups[i])
    samples = [(groups[i], sample(tensors[i])) for i in order]
    if not samples:
        return torch.zeros((count, BINS), dtype=torch.int64)
    total = torch.zeros(count * BINS, dtype=torch.int64, device=samples[0][1].device)
    start = 0
    while start < len(samples):
        end, size = start, 0
        while end < len(samples) and (end == start or size + samples[end][1].numel() <= CHUNK):
            size += samples[end][1].numel()
            end += 1
        total += _binned(samples[start:end], count)
        start = end
    return total.reshape(count, BINS)


def _binned(samples: Sequence[tuple[int, torch.Tensor]], count: int) -> torch.Tensor:
    """The flat histogram (``count`` · :data:`BINS`) of (group, sample) pairs sorted by group."""
    first = samples[0][1].dtype
    flat = torch.cat([s.to(torch.float64) if s.dtype != first else s for _, s in samples])
    index = _bins(flat)
    runs: dict[int, list[int]] = {}  # group → [first element, end] of its run in ``flat``
    end = 0
    for group, s in samples:
        end += s.numel()
        runs.setdefault(group, [end - s.numel(), end])[1] = end
    for group, (first_element, last) in runs.items():
        if group:
            index[first_element:last] += group * BINS
    return torch.bincount(index, minlength=count * BINS)


def layer_histograms(count: int, tensors: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """One histogram per layer (``count`` × :data:`BINS`) of (layer index, tensor) pairs, on the first tensor's
    device: a few kernels per device the tensors are on."""
    device = tensors[0][1].device if tensors else torch.device("cpu")
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
    for group, t in tensors:
        members, owners = by_device.setdefault(t.device, ([], []))
        members.append(t)
        owners.append(group)
    total = torch.zeros((count, BINS), dtype=torch.int64, device=device)
    for members, owners in by_device.values():
        total += grouped_histograms(members, owners, count).to(device)
    return total


def shifted_histogram(hist: Sequence[float], shift: int) -> tuple[float, ...]:
    """The histogram of g / 2^shift: every finite non-zero exponent moves down by ``shift``."""
    if shift == 0 or not hist:
        return tuple(hist)
    head = list(hist[: NON_FINITE_BIN + 1])
    body = [0.0] * (BINS - NON_FINITE_BIN - 1)
    for index in range(NON_FINITE_BIN + 1, BINS):
        target = min(max(index - shift, NON_FINITE_BIN + 1), BINS - 1)
        body[target - NON_FINITE_BIN - 1] += hist[index]
    return (*head, *body)


def share_at_most(hist: Sequence[float], exponent: int) -> float:
    """Share of the non-zero finite elements with frexp exponent ≤ ``exponent``."""
    nonzero = sum(hist[NON_FINITE_BIN + 1 :])
    if nonzero == 0:
        return 0.0
    top = min(max(exponent + OFFSET, NON_FINITE_BIN), BINS - 1)
    return sum(hist[NON_FINITE_BIN + 1 : top + 1]) / nonzero


def share_at_least(hist: Sequence[float], exponent: int) -> float:
    """Share of the non-zero finite elements with frexp exponent ≥ ``exponent`` (NaN/Inf are not fp16's doing)."""
    nonzero = sum(hist[NON_FINITE_BIN + 1 :])
    if nonzero == 0:
        return 0.0
    start = min(max(exponent + OFFSET, NON_FINITE_BIN + 1), BINS)
    return sum(hist[start:]) / nonzero


def largest_exponent(hist: Sequence[float]) -> int | None:
    """The largest finite exponent present, or None when every element is zero or non-finite."""
    for index in range(BINS - 1, NON_FINITE_BIN, -1):
        if hist[index]:
            return index - OFFSET
    return None


def recommended_scale(hists: Sequence[Sequence[float]]) -> float:
    """The largest power of two (≤ 2²⁴) that keeps every gradient below 2¹⁵ in fp16, GradScaler-style."""
    tops = [e for e in (largest_exponent(h) for h in hists) if e is not None]
    if not tops:
        return 1.0
    return float(2 ** max(0, min(MAX_SCALE_EXP, HEADROOM_EXP - max(tops))))
