"""What half precision would do to the gradients: a base-2 exponent histogram per layer.

Each gradient tensor (every activation-gradient call and every parameter gradient) contributes
the histogram of ``frexp`` exponents of at most :data:`SAMPLE` evenly strided elements, reduced on
the device. From it any threshold is a prefix sum on the host: the share that fp16 rounds to 0
(|g| < 2⁻²⁵ ≈ 2.98e-8, half its smallest subnormal 5.96e-8), keeps only as subnormal (< 2⁻¹⁴ ≈
6.10e-5) or overflows (≥ 2¹⁶ > 65504), what bf16 rounds to 0 (< 2⁻¹³⁴), and the same after a loss
scale of 2^s, for any s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradcheck_cli.diagnose.rule_codes import FP16_OVERFLOW, FP16_UNDERFLOW
from gradcheck_cli.report.report import Finding, Severity
from gradcheck_cli.report.sections import Precision, PrecisionLayer

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
    magnitude = flat.abs()
    _, exponent = torch.frexp(magnitude)
    index = (exponent.to(torch.int64) + OFFSET).clamp_(NON_FINITE_BIN + 1, BINS - 1)
    index = torch.where(magnitude == 0, ZERO_BIN, index)
    return torch.where(torch.isfinite(magnitude), index, NON_FINITE_BIN)


def exponent_histogram(tensor: torch.Tensor) -> torch.Tensor:
    """Counts of zero, non-finite and each base-2 exponent among a strided sample (int64, on the device)."""
    return torch.bincount(_bins(sample(tensor)), minlength=BINS)


def grouped_histograms(tensors: Sequence[torch.Tensor], groups: Sequence[int], count: int) -> torch.Tensor:
    """One histogram per group (``count`` × :data:`BINS`) over many tensors of one device, in a few kernels."""
    samples = [sample(t) for t in tensors]
    if not samples:
        return torch.zeros((count, BINS), dtype=torch.int64)
    flat = torch.cat([s.to(torch.float64) if s.dtype != samples[0].dtype else s for s in samples])
    sizes = torch.tensor([s.numel() for s in samples], device=flat.device)
    owner = torch.repeat_interleave(torch.tensor(list(groups), device=flat.device), sizes)
    return torch.bincount(owner * BINS + _bins(flat), minlength=count * BINS).reshape(count, BINS)


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


def precision_layer(name: str, hist: Sequence[float], max_abs: float, scale: float) -> PrecisionLayer:
    """One layer's shares, from its exponent histogram."""
    total = sum(hist)
    shift = round(math.log2(scale)) if scale > 0 else 0
    return PrecisionLayer(
        layer=name,
        elements=int(total),
        zero=hist[ZERO_BIN] / total if total else 0.0,
        fp16_flush=share_at_most(hist, FP16_FLUSH_EXP),
        fp16_subnormal=share_at_most(hist, FP16_SUBNORMAL_EXP),
        fp16_overflow=share_at_least(hist, FP16_OVERFLOW_EXP),
        bf16_flush=share_at_most(hist, BF16_FLUSH_EXP),
        max_abs=max_abs,
        fp16_flush_scaled=share_at_most(hist, FP16_FLUSH_EXP - shift),
    )


FLUSH_SHARE = 0.10
"""GC013 fires when a layer would still lose this share to fp16 flush-to-zero at the recommended scale
(healthy zoo: at most 8.4 %, the early steps of an unrolled 50-step LSTMCell)."""
OVERFLOW_SHARE = 0.001
"""GC014 fires when this share of a layer's gradient would exceed fp16's range unscaled (healthy zoo: 0)."""


def precision_section(
    names: Sequence[str],
    hists: Sequence[Sequence[float]],
    max_abs: Sequence[float],
    *,
    autocast: str | None = None,
    scale_used: float = 1.0,
    lost: tuple[tuple[str, float], ...] = (),
) -> Precision:
    """Per-layer shares and the recommended loss scale, from the probe's histograms."""
    scale = recommended_scale(hists)
    layers = tuple(
        precision_layer(name, hist, peak, scale)
        for name, hist, peak in zip(names, hists, max_abs, strict=True)
        if sum(hist)
    )
    return Precision(layers, scale, autocast, scale_used, lost)


def precision_findings(section: Precision, *, half: bool) -> tuple[Finding, ...]:
    """GC013/GC014: what fp16 would lose.

    For a float32 model (``half`` False) they are information, and GC013 only fires when even the
    loss scale a GradScaler would reach leaves 10 % of a layer flushed to zero. For a model that
    holds fp16 parameters or was probed under fp16 autocast they are warnings, and GC013 fires on
    the unscaled share: that is what training without a scaler loses.
    """
    severity = Severity.WARNING if half else Severity.INFO
    findings = []

    def lost(p: PrecisionLayer) -> float:
        return p.fp16_flush if half else p.fp16_flush_scaled

    flushed = [p for p in section.layers if lost(p) >= FLUSH_SHARE]
    if flushed:
        worst = max(flushed, key=lost)
        findings.append(
            Finding(
                FP16_UNDERFLOW.code,
                FP16_UNDERFLOW.name,
                severity,
                None,
                flushed[0].layer,
                f"in fp16, {worst.fp16_flush:.0%} of {worst.layer}'s non-zero gradient elements would flush to 0 "
                f"without loss scaling and {worst.fp16_flush_scaled:.0%} at the loss scale "
                f"2^{int(math.log2(section.recommended_scale))} ({len(flushed)} layer(s) lose ≥ {FLUSH_SHARE:.0%} "
                f"{'unscaled' if half else 'even scaled'}); bf16 would flush {worst.bf16_flush:.0%}",
                {
                    "layers": [p.layer for p in flushed],
                    "worst_layer": worst.layer,
                    "fp16_flush": worst.fp16_flush,
                    "fp16_flush_scaled": worst.fp16_flush_scaled,
                    "bf16_flush": worst.bf16_flush,
                    "recommended_scale": section.recommended_scale,
                },
            )
        )
    overflow = [p for p in section.layers if p.fp16_overflow >= OVERFLOW_SHARE]
    if overflow:
        worst = max(overflow, key=lambda p: p.fp16_overflow)
        findings.append(
            Finding(
                FP16_OVERFLOW.code,
                FP16_OVERFLOW.name,
                severity,
                None,
                overflow[0].layer,
                f"in fp16, {worst.fp16_overflow:.1%} of {worst.layer}'s gradient elements would exceed 65504 and "
                f"become Inf ({len(overflow)} layer(s)); the largest is {worst.max_abs:.3g}",
                {"layers": [p.layer for p in overflow], "worst_layer": worst.layer, "share": worst.fp16_overflow},
            )
        )
    return tuple(findings)
