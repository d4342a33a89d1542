"""The layer axis: at most ``MAX_TICKS`` names under it, one per layer, per block or every k-th layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradcheck_cli.render.charts.style import RED, short, y_grid
from gradcheck_cli.report.report import LayerStats

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAX_TICKS = 25
"""At most this many layer names under the x axis."""


@dataclass(frozen=True)
class Tick:
    """One label under the layer axis: layers ``start``…``end`` (indices in forward order) share it."""

    start: int
    end: int
    label: str

    @property
    def centre(self) -> float:
        return (self.start + self.end) / 2


def layer_ticks(names: Sequence[str], limit: int = MAX_TICKS) -> list[Tick]:
    """At most ``limit`` labels for layers in forward order.

    Every layer when they fit; else consecutive layers of one block (``transformer.h.3.attn``,
    ``transformer.h.3.mlp.c_fc``…) share one label ``transformer.h.3.*``; when even the blocks do not
    fit, labels closer than ``len(names) / limit`` layers are dropped (the first and last kept).
    """
    if len(names) <= limit:
        return [Tick(i, i, short(name or "(root)")) for i, name in enumerate(names)]
    labelled = [Tick(g.start, g.end, short(g.label + ".*" if g.end > g.start else g.label)) for g in blocks(names)]
    gap = len(names) / limit  # labels closer than this (in layers) would overlap
    kept: list[Tick] = []
    for k, tick in enumerate(labelled):
        if not kept or tick.centre - kept[-1].centre >= gap:
            kept.append(tick)
        elif k == len(labelled) - 1:  # the output end keeps its name
            kept[-1] = tick
    if len(kept) <= limit:
        return kept
    return kept[:: math.ceil(len(kept) / limit)]


def blocks(names: Sequence[str]) -> list[Tick]:
    """Runs of consecutive layers with the same ``block_key``, labelled with the key."""
    groups: list[Tick] = []
    for i, name in enumerate(names):
        key = block_key(name)
        if groups and block_key(names[groups[-1].start]) == key and key != name:
            groups[-1] = Tick(groups[-1].start, i, groups[-1].label)
        else:
            groups.append(Tick(i, i, key))
    return groups


def block_key(name: str) -> str:
    """The repeated block a layer belongs to: the name up to its first numeric part.

    ``transformer.h.3.attn.c_attn`` → ``transformer.h.3``; ``layer2.1.conv1`` → ``layer2.1``;
    ``encoder.layers.0.linear1`` → ``encoder.layers.0``; a name without a numeric part is its own block.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def label_room(ticks: Sequence[Tick]) -> float:
    """Inches under the axis that the rotated names need."""
    longest = max((len(t.label) for t in ticks), default=4)
    return 0.35 + 0.052 * longest


def draw_layer_axis(ax: Axes, layers: Sequence[LayerStats], ticks: Sequence[Tick]) -> None:
    """Names under the axis (≤ MAX_TICKS, rotated, SVG ids ``layer-tick-<k>``), block extents shaded,
    flagged names in red, and an axis label that says how the names were chosen."""
    from matplotlib.ticker import FixedLocator, NullLocator

    grouped = any(t.end > t.start for t in ticks)
    positions = [t.centre if grouped else float(t.start) for t in ticks]
    ax.set_xticks(positions, [t.label for t in ticks], rotation=40, ha="right", rotation_mode="anchor", fontsize=8)
    if len(layers) <= 400 and len(ticks) < len(layers):
        ax.xaxis.set_minor_locator(FixedLocator(list(range(len(layers)))))
    else:
        ax.xaxis.set_minor_locator(NullLocator())
    for k, (tick, text) in enumerate(zip(ticks, ax.get_xticklabels(), strict=True)):
        text.set_gid(f"layer-tick-{k}")
        if any(layer.flags for layer in layers[tick.start : tick.end + 1]):
            text.set_color(RED)
    every = blocks([layer.name for layer in layers])
    runs = [g for g in every if g.end > g.start] if grouped else []
    if len(runs) <= MAX_TICKS:  # every other block shaded, where each block has its own name
        for run in runs[1::2]:
            ax.axvspan(run.start - 0.5, run.end + 0.5, color="#f2f2f2", zorder=0.2, lw=0)
    n = len(layers)
    if grouped:
        how = "names grouped by block" + ("" if len(ticks) == len(every) else f", {len(ticks)} of {len(every)} named")
    elif len(ticks) == n:
        how = "every layer named"
    else:
        how = f"{len(ticks)} of {n} names shown"
    ax.set_xlabel(f"{n} layers in forward order, input end → output end ({how})")
    y_grid(ax)
