"""Which path the verdict follows: from the autograd graph when the probe read it, else forward order. No torch.

With the graph (``ProbeResult.graph``), every call on a path to the loss has a depth from the loss, the calls
next to it towards the loss, and its output ends (the calls nearest the loss that it reaches). A call's
gradient is compared with the pooled gradient of its own output ends (√Σ‖·‖² over them: parallel heads
pool, they are not steps of a path), so nothing depends on the order modules were called in. The path
judged runs from the deepest call (the input end) along the longest chain of calls to an output end; a
branch whose own path is outside the limits while the deepest one is not (a sick head beside healthy
ones) is judged along its own path instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradcheck_cli.probe.results import CallGraph, ProbeResult


@dataclass(frozen=True)
class Step:
    """One step of the path: a layer (and call) with the gradient magnitude measured there."""

    layer: int
    value: float


@dataclass(frozen=True)
class Path:
    """The path the verdict follows and what each call is compared with."""

    points: tuple[Step, ...]
    """The calls along the path, input end first."""
    out_end: float | None
    """The gradient at the output end: the pooled norm of the path's output ends."""
    ends: tuple[int, ...] = ()
    """Layer indices of the output ends pooled into ``out_end``, largest gradient first."""
    rel: tuple[tuple[int, float], ...] = ()
    """(layer, gradient ÷ its own output end's) of every call on a path to the loss."""
    layer_ref: tuple[tuple[int, float], ...] = ()
    """(layer, its own output end's gradient) for every layer on a path to the loss."""
    layer_depth: tuple[tuple[int, int], ...] = ()
    """(layer, depth from the loss of its deepest call); empty where the graph was not read."""
    from_graph: bool = False


def follow(result: ProbeResult, limits: tuple[float, float]) -> Path:
    """The path to judge: along the autograd graph when the probe read it, else every call in forward order.

    ``limits``: (vanishing, exploding) attenuation, to choose a branch that is outside them over a deepest
    path that is not.
    """
    values = [_value(result, layer, call) for layer, call in result.call_order]
    graph = result.graph
    if graph is None or not _complete(graph, values):
        return _forward_order(result, values)
    return _along_graph(result, graph, values, limits)


def _value(result: ProbeResult, layer: int, call: int) -> float | None:
    norm = result.layers[layer].calls[call]
    return None if norm is None else norm.l2


def _complete(graph: CallGraph, values: Sequence[float | None]) -> bool:
    """Whether the graph places every call that got a gradient (else forward order is the better guess)."""
    if len(graph.depth) != len(values):
        return False
    return all(d is not None for d, v in zip(graph.depth, values, strict=True) if v is not None)


def _forward_order(result: ProbeResult, values: Sequence[float | None]) -> Path:
    points = tuple(Step(layer, v) for (layer, _), v in zip(result.call_order, values, strict=True) if v is not None)
    out_end = points[-1].value if points else None
    rel = tuple((p.layer, p.value / out_end) for p in points if out_end and math.isfinite(out_end))
    refs = tuple((p.layer, out_end) for p in points if out_end is not None)
    ends = (points[-1].layer,) if points else ()
    return Path(points, out_end, ends, rel, refs)


def _along_graph(
    result: ProbeResult, graph: CallGraph, values: Sequence[float | None], limits: tuple[float, float]
) -> Path:
    order = sorted((d, p) for p, d in enumerate(graph.depth) if d is not None)
    ends: dict[int, frozenset[int]] = {}
    for _, p in order:  # nearest the loss first: every next call is nearer
        own = frozenset((p,)) if graph.direct[p] else frozenset()
        ends[p] = own.union(*(ends[n] for n in graph.next[p] if n in ends))
    refs = {p: _pooled([values[e] for e in ends[p]]) for p in ends}
    rel = {p: _ratio(values[p], refs[p]) for p in ends}
    layer_of = [layer for layer, _ in result.call_order]
    inputs: dict[frozenset[int], int] = {}
    for p in ends:
        if values[p] is not None and (ends[p] not in inputs or _deeper(graph, layer_of, p, inputs[ends[p]])):
            inputs[ends[p]] = p
    if not inputs:
        return _forward_order(result, values)
    start = _judged_input(graph, layer_of, list(inputs.values()), rel, limits)
    chain = _chain(graph, layer_of, values, start)
    points = tuple(Step(layer_of[p], v) for p in chain if (v := values[p]) is not None)
    end_layers = sorted(ends[start], key=lambda e: (-(values[e] or 0.0), layer_of[e]))
    depth: dict[int, int] = {}
    layer_ref: dict[int, float] = {}
    for d, p in order:
        depth[layer_of[p]] = max(depth.get(layer_of[p], 0), d)
        ref = refs[p]
        if ref is not None:
            layer_ref.setdefault(layer_of[p], ref)
    return Path(
        points=points,
        out_end=refs[start],
        ends=tuple(dict.fromkeys(layer_of[e] for e in end_layers)),
        rel=tuple((layer_of[p], r) for p, r in sorted(rel.items()) if r is not None),
        layer_ref=tuple(sorted(layer_ref.items())),
        layer_depth=tuple(sorted(depth.items())),
        from_graph=True,
    )


def _deeper(graph: CallGraph, layer_of: Sequence[int], a: int, b: int) -> bool:
    """Whether call ``a`` is farther from the loss than ``b`` (ties: the layer defined first, then its first call)."""
    da, db = graph.depth[a] or 0, graph.depth[b] or 0
    return (-da, layer_of[a], a) < (-db, layer_of[b], b)


def _judged_input(
    graph: CallGraph,
    layer_of: Sequence[int],
    candidates: list[int],
    rel: dict[int, float | None],
    limits: tuple[float, float],
) -> int:
    """The input end to judge from: the deepest one, unless it is within the limits and another branch is not
    (then the branch farthest outside them)."""
    deepest = candidates[0]
    for c in candidates[1:]:
        if _deeper(graph, layer_of, c, deepest):
            deepest = c
    if not _outside(rel[deepest], limits):
        outside = [c for c in candidates if _outside(rel[c], limits)]
        if outside:
            return max(outside, key=lambda c: (_distance(rel[c]), graph.depth[c] or 0, -layer_of[c]))
    return deepest


def _outside(ratio: float | None, limits: tuple[float, float]) -> bool:
    return ratio is not None and not math.isnan(ratio) and not limits[0] <= ratio <= limits[1]


def _distance(ratio: float | None) -> float:
    """How far a ratio is from 1 in orders of magnitude (0 and inf are infinitely far)."""
    if ratio is None or math.isnan(ratio):
        return -1.0
    if ratio == 0 or math.isinf(ratio):
        return math.inf
    return abs(math.log10(ratio))


def _chain(graph: CallGraph, layer_of: Sequence[int], values: Sequence[float | None], start: int) -> list[int]:
    """From ``start`` towards the loss along the longest chain of calls (ties: the larger gradient)."""
    chain = [start]
    current = start
    while True:  # each step strictly nearer the loss, so it ends (a reused cell's calls may point back)
        here = graph.depth[current]
        known = [
            n
            for n in graph.next[current]
            if (d := graph.depth[n]) is not None and (here is None or d < here) and n not in chain
        ]
        if not known:
            return chain
        current = max(known, key=lambda n: (graph.depth[n] or 0, _finite_or_zero(values[n]), -layer_of[n]))
        chain.append(current)


def _finite_or_zero(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else 0.0


def _pooled(values: Sequence[float | None]) -> float | None:
    """√Σ v² over the values measured (NaN when any is NaN)."""
    measured = [v for v in values if v is not None]
    if not measured:
        return None
    return math.sqrt(sum(v * v for v in measured))


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or ref is None or math.isnan(value) or not math.isfinite(ref) or ref == 0:
        return None
    return value / ref
