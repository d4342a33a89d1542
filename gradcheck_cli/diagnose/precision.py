"""What half precision would do to the gradients, as the report shows it: per-layer shares of the probe's
exponent histograms (probe/precision.py), the recommended loss scale, and GC013/GC014."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradcheck_cli.diagnose.rule_codes import FP16_OVERFLOW, FP16_UNDERFLOW
from gradcheck_cli.probe.precision import (
    BF16_FLUSH_EXP,
    FP16_FLUSH_EXP,
    FP16_OVERFLOW_EXP,
    FP16_SUBNORMAL_EXP,
    ZERO_BIN,
    recommended_scale,
    share_at_least,
    share_at_most,
)
from gradcheck_cli.report.report import Finding, Severity
from gradcheck_cli.report.sections import Precision, PrecisionLayer


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
