"""The page's layer table: one row per layer in forward order (``#L{index}``), grouped by block, sortable."""

from __future__ import annotations

import math
import re

from gradcheck_cli.render.html.markup import code, e, num, plural, sort_value
from gradcheck_cli.render.numbers import count, number
from gradcheck_cli.render.view import forward_order, relative_gradients
from gradcheck_cli.report.report import LayerStats, Report

BAR_DECADES = 8
"""The table's bars span 10^-8 … 10^+8 of the output end's gradient, like the terminal's."""


_BLOCK = re.compile(r"^(.*?\.\d+)\.")
"""The block a layer belongs to: its name up to the first numbered component that has children."""


def block_of(name: str) -> str:
    """The block a layer is grouped under: ``transformer.h.3.attn.c_attn`` → ``transformer.h.3``;
    ``transformer.wte`` → ``transformer``; a top-level layer → ``""`` (no group)."""
    match = _BLOCK.match(name)
    if match:
        return match.group(1)
    return name.rpartition(".")[0]


def _bar(value: float | None, bad: bool) -> str:
    """A log bar from 1 (the middle) to the value, ±``BAR_DECADES`` decades."""
    if value is None or math.isnan(value):
        return ""
    if value <= 0:
        left, width = 0.0, 50.0
    elif math.isinf(value):
        left, width = 50.0, 50.0
    else:
        decades = max(-BAR_DECADES, min(BAR_DECADES, math.log10(value)))
        width = abs(decades) / BAR_DECADES * 50
        left = 50 - width if decades < 0 else 50.0
    cls = ' class="bad"' if bad else ""
    style = f"left:{left:.1f}%;width:{max(width, 0.8):.1f}%"
    return f'<span class="bar" aria-hidden="true"><i{cls} style="{style}"></i></span>'


def layer_table(report: Report) -> str:
    if not report.layers:
        return "<p>no layer owns parameters</p>"
    activation = report.path.measured_with == "activation_gradients"
    multi = any(layer.calls > 1 for layer in report.layers)
    rel = relative_gradients(report)
    headers: list[tuple[str, str, str]] = [("#", "num", "n")]  # title, sort kind, cell class
    headers += [("layer", "text", ""), ("type", "text", "")]
    if multi:
        headers.append(("calls", "num", "n"))
    headers.append(("∂L/∂h ÷ out" if activation else "g/w ÷ last", "num", "n"))
    if activation:
        headers.append(("‖∂L/∂h‖", "num", "n"))
    headers += [("‖∂L/∂W‖", "num", "n"), ("‖∂L/∂W‖/‖W‖", "num", "n"), ("params", "num", "n"), ("flags", "text", "")]
    head = "".join(
        f'<th scope="col" data-sort="{kind}"'
        + (' data-natural aria-sort="ascending"' if title == "#" else "")
        + (f' class="{cls}"' if cls else "")
        + f">{e(title)}</th>"
        for title, kind, cls in headers
    )
    order = forward_order(report)
    blocks = [block_of(report.layers[i].name) for i in order]
    grouped = any(blocks) and len(set(blocks)) > 1
    rows: list[str] = []
    for k, index in enumerate(order):
        layer = report.layers[index]
        if grouped and (k == 0 or blocks[k] != blocks[k - 1]):
            rows.append(_group_row(report, order, blocks, k, rel, len(headers)))
        rows.append(_layer_row(index, k, layer, rel.get(index), multi, activation))
    flagged = sum(1 for layer in report.layers if layer.flags)
    intro = (
        f"<p class='muted'>{plural(len(report.layers), 'layer')} that own parameters, in forward order"
        + (", grouped by block" if grouped else "")
        + (f"; {flagged} flagged" if flagged else "")
        + ". Click a column heading to sort (the # column restores the forward order).</p>"
    )
    return (
        f'{intro}\n<table class="layers sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def _group_row(
    report: Report, order: list[int], blocks: list[str], k: int, rel: dict[int, float | None], columns: int
) -> str:
    members = []
    j = k
    while j < len(order) and blocks[j] == blocks[k]:
        members.append(order[j])
        j += 1
    values = [v for i in members if (v := rel.get(i)) is not None and math.isfinite(v) and v > 0]
    flagged = sum(1 for i in members if report.layers[i].flags)
    info = [plural(len(members), "layer")]
    if values:
        info.append(f"∂L/∂h ÷ out {number(min(values), '.2g')} … {number(max(values), '.2g')}")
    if flagged:
        info.append(f"{flagged} flagged")
    return (
        f'<tr class="grp" data-pos="{k - 0.5}"><th colspan="{columns}" scope="rowgroup">'
        f"{code(blocks[k]) if blocks[k] else '(top level)'} <span class='muted'>· {e(' · '.join(info))}</span>"
        "</th></tr>"
    )


def _layer_row(index: int, k: int, layer: LayerStats, value: float | None, multi: bool, activation: bool) -> str:
    bad = bool(layer.flags)
    cls = ' class="flagged"' if bad else ""
    position = "–" if layer.position < 0 else str(layer.position)
    flags = ", ".join(layer.flags)
    if layer.frozen:
        flags = (flags + ", " if flags else "") + "frozen"
    cells = [
        f'<td class="n" data-v="{k}">{e(position)}</td>',
        f'<td class="name">{code(layer.name or "(root)")}</td>',
        f"<td>{e(layer.type)}</td>",
    ]
    if multi:
        cells.append(f'<td class="n" data-v="{layer.calls}">{layer.calls}</td>')
    cells.append(f'<td class="n" data-v="{sort_value(value)}">{num(value, ".2e")}{_bar(value, bad)}</td>')
    if activation:
        cells.append(f'<td class="n" data-v="{sort_value(layer.act_grad_norm)}">{num(layer.act_grad_norm, ".2e")}</td>')
    ratio = layer.grad_weight_ratio
    cells += [
        f'<td class="n" data-v="{sort_value(layer.grad_norm)}">{num(layer.grad_norm, ".2e")}</td>',
        f'<td class="n" data-v="{sort_value(ratio)}">{num(ratio, ".2e")}</td>',
        f'<td class="n" data-v="{layer.params}">{e(count(layer.params))}</td>',
        f'<td class="flag">{e(flags)}</td>' if bad else f'<td class="muted">{e(flags)}</td>',
    ]
    return f'<tr id="L{index}" data-pos="{k}"{cls}>' + "".join(cells) + "</tr>"
