"""Whether the gradient reaches the layers at all: a cut graph, an output the loss did not use, and a gradient
that is exactly zero everywhere. No torch."""

from __future__ import annotations

import math

from gradcheck_cli.diagnose.rule_codes import NO_GRADIENT, UNUSED_LAYER, VANISHING
from gradcheck_cli.probe.results import ProbeResult
from gradcheck_cli.report.report import Finding, Problem, Severity

ZERO_CAUSES = (
    "a softmax over a single unit (its output is the constant 1), a constant output, or an output made by a "
    "piecewise-constant op (round, argmax, sign, a step function)"
)


def no_gradient(result: ProbeResult, flagged: dict[int, str]) -> list[Finding]:
    """Layers that ran, with parameters, while no gradient reached them: the path is cut (GC005), unless the
    autograd graph shows that they feed only model outputs the loss did not use (GC007, a note)."""
    if not result.activation_hooks:  # a TorchScript layer's empty bias slot may be a branch that never ran
        return []
    reached = any(m.grad is not None for m in result.layers)
    silent = [i for i, m in enumerate(result.layers) if m.calls and m.grad is None and all(c is None for c in m.calls)]
    if not reached or not silent:
        return []
    unused = [i for i in silent if _feeds_only_unused_outputs(result, i)]
    cut = [i for i in silent if i not in unused]
    findings = []
    if cut:
        for i in cut:
            flagged[i] = "no_gradient"
        names = [result.layers[i].name for i in cut]
        findings.append(
            Finding(
                NO_GRADIENT.code,
                NO_GRADIENT.name,
                Severity.ERROR,
                Problem.VANISHING,
                names[0],
                f"{len(cut)} layer(s) ran in the forward pass but received no gradient at all (first: {names[0]}): "
                "the graph is cut between them and the loss (.detach(), torch.no_grad(), .item() or an integer op)",
                {"layers": names},
            )
        )
    if unused:
        names = [result.layers[i].name for i in unused]
        findings.append(
            Finding(
                UNUSED_LAYER.code,
                UNUSED_LAYER.name,
                Severity.INFO,
                None,
                names[0],
                f"{len(unused)} layer(s) feed only model outputs that the loss did not use (first: {names[0]}), so "
                f"no gradient reaches them in this probe; that is not a cut graph{_used_output(result)} (choose the "
                "output the loss is computed from with loss_output / --loss-output)",
                {"layers": names, "unused_by_loss": True},
            )
        )
    return findings


def _used_output(result: ProbeResult) -> str:
    """The loss choice's note on which output it used (probe/loss.py), as a clause."""
    description = result.loss.description
    at = description.find("the loss used ")
    return "" if at < 0 else ": " + description[at:].split(" and left out")[0]


def _feeds_only_unused_outputs(result: ProbeResult, layer: int) -> bool:
    graph = result.graph
    if graph is None or len(graph.unused_output) != len(result.call_order):
        return False
    mine = [p for p, (index, _) in enumerate(result.call_order) if index == layer]
    return bool(mine) and all(graph.unused_output[p] for p in mine)


def zero_everywhere(result: ProbeResult, flagged: dict[int, str]) -> list[Finding]:
    """Every gradient measured is exactly 0 while the loss is finite: the extreme of vanishing (GC001, error).

    Not GC005: the graph is whole (every layer got a gradient tensor), the derivative along it is just 0, which
    no optimiser can use. The cause is named from ‖∂L/∂output‖ and the operations between the layers and the loss.
    """
    norms = [n for m in result.layers for n in (m.grad, *m.calls) if n is not None]
    if not norms or not math.isfinite(result.loss_value) or any(n.l2 != 0 or not n.finite for n in norms):
        return []
    for i, m in enumerate(result.layers):
        if m.grad is not None or any(c is not None for c in m.calls):
            flagged.setdefault(i, Problem.VANISHING.value)
    nearest = _nearest_layers(result)
    where = f" ({', '.join(nearest[:3])})" if nearest else ""
    ops = result.graph.tail_ops if result.graph is not None else ()
    through = f" between the layers nearest the loss{where} and the loss: {' ← '.join(ops)}" if ops else ""
    if result.output_grad is not None and result.output_grad == 0:
        cause = (
            "the loss does not change with the model's output (‖∂L/∂output‖ = 0): the loss is constant in the "
            f"output{through}"
        )
    else:
        measured = "" if result.output_grad is None else f" (‖∂L/∂output‖ = {result.output_grad:.3g})"
        cause = (
            f"the model's output does not depend on its input or its weights{measured}: an operation after the "
            f"last layers passes no gradient{through}; typical: {ZERO_CAUSES}"
        )
    return [
        Finding(
            VANISHING.code,
            VANISHING.name,
            Severity.ERROR,
            Problem.VANISHING,
            nearest[0] if nearest else None,
            f"no gradient at all: every one of the {len(norms)} gradients measured is exactly 0, so no step can "
            f"change any weight — {cause}",
            {"zero_everywhere": True, "output_grad": result.output_grad, "ops": list(ops), "nearest_layers": nearest},
        )
    ]


def _nearest_layers(result: ProbeResult) -> list[str]:
    """The layers whose output reaches the loss through no other layer (from the graph), else the last called."""
    graph = result.graph
    if graph is not None and len(graph.direct) == len(result.call_order):
        names = [result.layers[index].name for p, (index, _) in enumerate(result.call_order) if graph.direct[p]]
        if names:
            return list(dict.fromkeys(names))
    return [result.layers[result.call_order[-1][0]].name] if result.call_order else []
