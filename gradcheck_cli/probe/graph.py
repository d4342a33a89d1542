"""Each forward call's place in the autograd graph: its depth from the loss and the calls next to it.

Read after the forward pass and before backward, by walking ``grad_fn.next_functions`` from the loss. The
nodes each hooked call's outputs were made by are the landmarks: a call's depth is the number of landmarks on
the longest chain from it to the loss, so it follows the graph, not the order modules were called in (heads
called in another order, or a trunk whose parallel heads read different scales, get the same depths).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from gradcheck_cli.probe.results import CallGraph

MAX_NEXT = 256
"""At most this many nearest calls are kept per node (a merge of hundreds of per-step losses)."""
MAX_TAIL_OPS = 12
"""At most this many operation names between the output ends and the loss."""

_EMPTY: frozenset[int] = frozenset()


def _children(node: Any) -> Iterable[Any]:
    return (child for child, _ in node.next_functions if child is not None)


def call_graph(
    loss: torch.Tensor, outputs: Sequence[torch.Tensor], call_nodes: Sequence[Sequence[Any]], calls: int
) -> CallGraph | None:
    """The :class:`CallGraph` of the first ``calls`` recorded calls, whose outputs were made by ``call_nodes``
    (per call, the ``grad_fn`` of each output as the forward hook saw it); ``outputs``: the model's
    floating-point outputs, to tell a layer the loss did not use from a cut graph. None without a graph."""
    root = loss.grad_fn
    if root is None or calls == 0:
        return None
    owner: dict[int, list[int]] = {}
    for call_id, nodes in enumerate(call_nodes[:calls]):
        for node in nodes:
            owner.setdefault(id(node), []).append(call_id)
    parents = _count_parents(root)
    depth: list[int | None] = [None] * calls
    nearest: list[set[int]] = [set() for _ in range(calls)]
    direct = [False] * calls
    tail: list[str] = []
    # per node: (deepest landmark count above it, nearest landmarks above it, reached from the loss without one)
    state: dict[int, tuple[int, frozenset[int], bool]] = {id(root): (0, _EMPTY, True)}
    ready = deque([root])
    while ready:
        node = ready.popleft()
        above, near, free = state.pop(id(node))
        mine = owner.get(id(node))
        if mine:
            for call_id in mine:
                depth[call_id] = above + 1
                nearest[call_id].update(near)
                direct[call_id] = direct[call_id] or free
            passed = (above + 1, frozenset(mine), False)
        else:
            if free and len(tail) < MAX_TAIL_OPS:
                tail.append(type(node).__name__)
            passed = (above, near, free)
        for child in _children(node):
            key = id(child)
            state[key] = _merge(state.get(key), passed)
            parents[key] -= 1
            if parents[key] == 0:
                ready.append(child)
    on_loss = {i for i, d in enumerate(depth) if d is not None}
    unused = _reaching_outputs(outputs, owner, parents.keys(), calls, on_loss)
    return CallGraph(
        depth=tuple(depth),
        next=tuple(tuple(sorted(n)) for n in nearest),
        direct=tuple(direct),
        unused_output=tuple(unused),
        tail_ops=tuple(dict.fromkeys(tail))[:MAX_TAIL_OPS],
    )


def _count_parents(root: Any) -> dict[int, int]:
    """Per node reachable from ``root``: how many edges lead into it (its parents, towards the loss)."""
    parents: dict[int, int] = {id(root): 0}
    seen = {id(root)}
    queue = deque([root])
    while queue:
        node = queue.popleft()
        for child in _children(node):
            key = id(child)
            parents[key] = parents.get(key, 0) + 1
            if key not in seen:
                seen.add(key)
                queue.append(child)
    return parents


def _merge(
    old: tuple[int, frozenset[int], bool] | None, new: tuple[int, frozenset[int], bool]
) -> tuple[int, frozenset[int], bool]:
    if old is None:
        return new
    near = old[1] if new[1] <= old[1] else new[1] if old[1] <= new[1] else old[1] | new[1]
    if len(near) > MAX_NEXT:
        near = frozenset(sorted(near)[:MAX_NEXT])
    return max(old[0], new[0]), near, old[2] or new[2]


def _reaching_outputs(
    outputs: Sequence[torch.Tensor], owner: dict[int, list[int]], on_loss: Iterable[int], calls: int, used: set[int]
) -> list[bool]:
    """Per call: off every path to the loss, but reaching one of the model's outputs (one the loss left out)."""
    seen = set(on_loss)
    queue = deque(t.grad_fn for t in outputs if t.grad_fn is not None and id(t.grad_fn) not in seen)
    reached = [False] * calls
    while queue:
        node = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for call_id in owner.get(id(node), ()):
            if call_id < calls and call_id not in used:
                reached[call_id] = True
        queue.extend(child for child in _children(node) if id(child) not in seen)
    return reached
