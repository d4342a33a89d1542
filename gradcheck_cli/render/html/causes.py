"""The page's causes: each cause line of the terminal report, with its whole table where it has one."""

from __future__ import annotations

import math
import re

from gradcheck_cli.render.causes_text import cause_lines
from gradcheck_cli.render.html.markup import code, e, num, plural, simple_table, ul
from gradcheck_cli.report.report import Report

OPEN_ROWS = 12
"""A cause's table starts open when it flags at most this many rows (its head line already counts them)."""


def _init_table(report: Report) -> str:
    audit = report.init_audit
    if audit is None or audit.skipped or not audit.layers:
        return ""
    flagged = sum(1 for layer in audit.layers if layer.flag)
    rows = [
        [
            code(layer.layer),
            e(layer.type),
            f"{layer.fan_in}→{layer.fan_out}",
            e(layer.activation + (" +norm" if layer.normalised else "")),
            num(layer.std),
            num(layer.kaiming_std),
            num(layer.xavier_std),
            num(layer.ratio, ".2f"),
            e(layer.looks_like),
            f'<span class="flag">{e(layer.flag)}</span>' if layer.flag else "",
        ]
        for layer in audit.layers
    ]
    table = simple_table(
        [
            ("weight", False),
            ("type", False),
            ("fan in→out", True),
            ("then", False),
            ("std", True),
            ("Kaiming std", True),
            ("Xavier std", True),
            ("×Kaiming", True),
            ("looks like", False),
            ("flag", False),
        ],
        rows,
        ["flagged" if layer.flag else "" for layer in audit.layers],
    )
    trained = ""
    if audit.trained_layers:
        trained = f"<p class='muted'>look trained (not audited): {', '.join(code(n) for n in audit.trained_layers)}</p>"
    open_ = " open" if 0 < flagged <= OPEN_ROWS else ""
    summary = f"{plural(len(audit.layers), 'weight')} audited, {flagged} flagged"
    return f"<details{open_}><summary>{e(summary)}</summary>{table}{trained}</details>"


def _activation_table(report: Report) -> str:
    acts = report.activations
    if not acts:
        return ""
    rows = [
        [
            code(a.layer),
            e(a.type),
            str(a.calls),
            e(f"{a.elements:,}"),
            num(a.derivative_rms),
            "–" if a.saturated is None else e(f"{a.saturated:.1%}"),
            "–" if a.dead is None else e(f"{a.dead:.1%}"),
            f'<span class="flag">{e(a.flag)}</span>' if a.flag else "",
        ]
        for a in acts
    ]
    table = simple_table(
        [
            ("activation", False),
            ("type", False),
            ("calls", True),
            ("elements", True),
            ("φ'(z) RMS", True),
            ("saturated", True),
            ("dead", True),
            ("flag", False),
        ],
        rows,
        ["flagged" if a.flag else "" for a in acts],
    )
    flagged = sum(1 for a in acts if a.flag)
    open_ = " open" if 0 < flagged <= OPEN_ROWS else ""
    summary = f"{plural(len(acts), 'activation')}, {flagged} flagged"
    return f"<details{open_}><summary>{e(summary)}</summary>{table}</details>"


def _precision_table(report: Report) -> str:
    precision = report.precision
    if precision is None or not precision.layers:
        return ""
    layers = sorted(precision.layers, key=lambda p: (-p.fp16_flush, -p.fp16_subnormal))
    exponent = round(math.log2(precision.recommended_scale)) if precision.recommended_scale > 0 else 0
    rows = [
        [
            code(p.layer),
            e(f"{p.elements:,}"),
            e(f"{p.zero:.1%}"),
            e(f"{p.fp16_flush:.1%}"),
            e(f"{p.fp16_flush_scaled:.1%}"),
            e(f"{p.fp16_subnormal:.1%}"),
            e(f"{p.fp16_overflow:.1%}"),
            e(f"{p.bf16_flush:.1%}"),
            num(p.max_abs, ".2e"),
        ]
        for p in layers
    ]
    table = simple_table(
        [
            ("layer", False),
            ("elements", True),
            ("zero in fp32", True),
            ("fp16 → 0", True),
            (f"fp16 → 0 at 2^{exponent}", True),
            ("fp16 subnormal", True),
            ("fp16 overflow", True),
            ("bf16 → 0", True),
            ("max |g|", True),
        ],
        rows,
    )
    lost = ""
    if precision.autocast is not None and precision.lost:
        lost = simple_table(
            [("layer", False), (f"lost under {precision.autocast} autocast", True)],
            [[code(name), e(f"{share:.1%}")] for name, share in precision.lost],
        )
    return f"<details><summary>per layer, worst first</summary>{table}{lost}</details>"


_CAUSE_TABLES = {
    "init audit": _init_table,
    "activations": _activation_table,
    "half precision": _precision_table,
}


def causes_section(report: Report) -> str:
    blocks = []
    lines = cause_lines(report)
    lines.sort(key=lambda line: not line.startswith("first non-finite:"))  # where NaN began matters most
    for line in lines:
        first, *rest = line.split("\n")
        label, _, text = first.partition(": ")
        if label == "init audit":  # the terminal's head line announces its short table; ours lists all
            text = re.sub(r",? first and last shown:$", "", text).rstrip(":")
        alarm = label == "first non-finite" or "flagged" in text or any("flagged" in r for r in rest)
        detail = ""
        if label in _CAUSE_TABLES:
            detail = _CAUSE_TABLES[label](report)
        more = ul(e(r.strip()) for r in rest) if rest else ""
        blocks.append(
            f'<div class="cause{" alarm" if alarm else ""}"><h3>{e(label)}</h3><p>{e(text)}</p>{more}{detail}</div>'
        )
    return "\n".join(blocks)
