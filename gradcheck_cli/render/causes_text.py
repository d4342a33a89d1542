"""The terminal report's cause sections: init audit, activations, precision, first non-finite, fixes."""

from __future__ import annotations

import math
import statistics
from collections import Counter

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.render.numbers import number
from gradcheck_cli.report.report import Recommendation, Report
from gradcheck_cli.report.sections import NonFiniteOrigin, TensorSummary, Verification

AUDIT_ROWS = 8
"""Audited layers shown in the terminal (the JSON report has all)."""


def causes(report: Report) -> list[RenderableType]:
    """The sections that say why: each only when it has something to say."""
    parts: list[RenderableType] = []
    if report.init_audit is not None and report.init_audit.layers:
        parts.append(_init_audit(report))
    if report.activations:
        parts.append(_activations(report))
    if report.precision is not None and report.precision.layers:
        parts.append(_precision(report))
    if report.non_finite_origin is not None:
        parts.append(_origin(report.non_finite_origin))
    return parts


def cause_lines(report: Report) -> list[str]:
    """The cause sections as plain paragraphs (Markdown, HTML): the init audit's head line, not its table."""
    lines = []
    for part in causes(report):
        if isinstance(part, Text):
            lines.append(part.plain)
        elif isinstance(part, Group) and part.renderables and isinstance(part.renderables[0], Text):
            lines.append(part.renderables[0].plain)
    return lines


def _init_audit(report: Report) -> RenderableType:
    audit = report.init_audit
    assert audit is not None
    layers = audit.layers
    head = Text("init audit: ", style="bold")
    if audit.skipped:
        head.append(f"skipped, {audit.skipped}", style="dim")
        return head
    # the scheme and the median scale describe the initialisation: trained weights are no scheme
    fresh = [layer for layer in layers if layer.looks_like != "trained"]
    if fresh:
        looks = Counter(layer.looks_like for layer in fresh).most_common(1)[0][0]
        ratio = statistics.median(layer.ratio for layer in fresh)
        which = "weights," if len(fresh) == len(layers) else f"weights; of the {len(fresh)} untrained,"
        needs = f"median {ratio:.2f}× the scale their activation needs"
        head.append(f"{len(layers)} {which} most look like {looks}; {needs}")
    else:
        head.append(f"{len(layers)} weights, all look trained")
    flagged = [layer for layer in layers if layer.flag]
    if audit.trained_layers:
        head.append(f"; {len(audit.trained_layers)} look trained (not audited)", style="dim")
    if not flagged:
        return head
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    for column in ("layer", "fan in→out", "then", "std", "×Kaiming", "looks like", "flag"):
        table.add_column(column, no_wrap=column != "layer", overflow="fold")
    shown = flagged if len(flagged) <= AUDIT_ROWS else [*flagged[: AUDIT_ROWS - 1], flagged[-1]]
    for layer in shown:
        table.add_row(
            layer.layer,
            f"{layer.fan_in}→{layer.fan_out}",
            layer.activation + (" +norm" if layer.normalised else ""),
            f"{layer.std:.3g}",
            f"{layer.ratio:.2f}",
            layer.looks_like,
            Text(layer.flag or "", style="red"),
        )
    head.append(f"; {len(flagged)} flagged" + (", first and last shown:" if len(flagged) > AUDIT_ROWS else ":"))
    return Group(head, table)


def _activations(report: Report) -> Text:
    acts = report.activations
    kinds = Counter(a.type for a in acts)
    text = Text("activations: ", style="bold")
    text.append(", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
    rms = statistics.median(a.derivative_rms for a in acts)
    text.append(f"; φ'(z) RMS median {rms:.3g}")
    saturated = [a.saturated for a in acts if a.saturated is not None]
    if saturated:
        text.append(f"; saturated up to {max(saturated):.0%}")
    dead = [a.dead for a in acts if a.dead is not None]
    if dead:
        text.append(f"; dead units up to {max(dead):.0%}")
    elif any(a.type in ("ReLU", "ReLU6") for a in acts):
        text.append("; dead units not measurable (fewer than 8 samples per unit)", style="dim")
    flagged = [a for a in acts if a.flag]
    if flagged:
        text.append(f"\n  {len(flagged)} flagged: ", style="red")
        text.append(", ".join(f"{a.layer} ({a.flag})" for a in flagged[:6]) + (" …" if len(flagged) > 6 else ""))
    return text


def _precision(report: Report) -> Text:
    precision = report.precision
    assert precision is not None
    layers = precision.layers
    worst = max(layers, key=lambda p: (p.fp16_flush, p.fp16_subnormal))
    text = Text("half precision: ", style="bold")
    exponent = int(math.log2(precision.recommended_scale))
    text.append(
        f"fp16 would flush up to {worst.fp16_flush:.1%} of a layer's gradient to 0 (layer {worst.layer}); "
        f"{max(p.fp16_flush_scaled for p in layers):.1%} at loss scale 2^{exponent}; "
        f"overflow up to {max(p.fp16_overflow for p in layers):.1%}; bf16 flushes up to "
        f"{max(p.bf16_flush for p in layers):.1%}"
    )
    if precision.autocast is not None:
        lost = max((share for _, share in precision.lost), default=0.0)
        text.append(
            f"\n  probed under {precision.autocast} autocast (loss scale {precision.scale_used:g}): up to {lost:.1%} "
            "of a layer's activation-gradient elements became 0 that were not in float32"
        )
    return text


def _origin(origin: NonFiniteOrigin) -> Text:
    text = Text("first non-finite: ", style="bold red")
    if origin.forward_module is not None:
        text.append(f"forward in {origin.forward_module or '(root)'} ({origin.forward_type})")
        if origin.non_finite_parameters:
            text.append(f", whose {', '.join(origin.non_finite_parameters)} is NaN/Inf")
        for k, summary in enumerate(origin.forward_inputs):
            text.append(f"\n  input {k}: {_summary(summary)}")
        if origin.forward_output is not None:
            text.append(f"\n  output: {_summary(origin.forward_output)}")
    else:
        text.append("no module's output was NaN/Inf in the forward pass")
    if origin.backward_module is not None:
        text.append(f"\n  backward: first NaN/Inf gradient at the output of {origin.backward_module or '(root)'} ")
        text.append(f"({origin.backward_type})")
        if origin.backward_grad is not None:
            text.append(f": {_summary(origin.backward_grad)}")
    return text


def _summary(t: TensorSummary) -> str:
    shape = "×".join(map(str, t.shape)) or "scalar"
    finite = (
        f"finite range [{number(t.finite_min)}, {number(t.finite_max)}], mean |x| {number(t.finite_abs_mean)}"
        if t.finite_min is not None
        else "no finite element"
    )
    return f"{shape}, {t.nan} NaN, {t.inf} Inf, {finite}"


def verification_line(rec: Recommendation, verification: Verification | None) -> Text | None:
    """``verified: attenuation 5.9e-08 → 0.83, healthy (0.4 s)`` under a recommendation."""
    if verification is None:
        return None
    if not verification.verified:
        return Text(f"not verified: {verification.reason}", style="dim")
    before, after = verification.before, verification.after
    text = Text("verified on a copy: ", style="bold green" if verification.fixed else "bold yellow")
    if before is not None and after is not None:
        text.append(f"attenuation {number(before.attenuation)} → {number(after.attenuation)}, ")
        if before.through_time is not None or after.through_time is not None:
            text.append(f"through time {number(before.through_time)} → {number(after.through_time)}, ")
        text.append(
            "healthy"
            if verification.fixed
            else (f"still {', '.join(after.problems)}" if after.problems else after.status)
        )
    if verification.applied:
        text.append(f"; {verification.applied}")
    text.append(f" ({verification.seconds:.2g} s)", style="dim")
    return text
