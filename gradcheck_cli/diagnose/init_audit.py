"""The initialisation audit (GC010): every Linear/Conv/RNN weight's scale against what its activation needs.

For each weight: fans (``nn.init`` convention; Hugging Face ``Conv1D`` stores (in, out)), standard deviation,
the activation that follows it in the forward pass, its gain, the Xavier and Kaiming scales, the ratio
std / Kaiming (the factor the layer multiplies the gradient's norm by beyond what its activation needs)
and the scheme it looks like. A stack flags when one layer is beyond ``LAYER_LIMIT`` off, or when the
factors of a run of unnormalised layers compound beyond ``COMPOUND_LIMIT``. Weights that no longer look
like an initialisation (no longer i.i.d.: a singular value, norm spread or mean beyond sampling) are listed,
never flagged. What follows each weight is :mod:`~gradcheck_cli.diagnose.following`'s decision, the statistics
of its entries :mod:`~gradcheck_cli.diagnose.weight_statistics`'.
Statistics, thresholds and the calibration table: docs/init_audit.md.
"""

from __future__ import annotations

import contextlib
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from gradcheck_cli.diagnose.following import Follower, activation_gain, following
from gradcheck_cli.diagnose.module_kinds import RECURRENT
from gradcheck_cli.diagnose.rule_codes import INIT_SCALE
from gradcheck_cli.diagnose.weight_statistics import WeightStats, looks_like, trained_evidence, weight_stats_all
from gradcheck_cli.probe.modules import module_type
from gradcheck_cli.report.report import Finding, Problem, Severity
from gradcheck_cli.report.sections import InitAudit, InitLayer

__all__ = [
    "COMPOUND_LIMIT",
    "INIT_SCALE",
    "LAYER_LIMIT",
    "audit_init",
    "audited_modules",
    "gradient_factor",
    "init_findings",
]

LAYER_LIMIT = 10**1.5
"""One layer flags alone when its gradient factor is beyond this either way: no convention is that far off."""
COMPOUND_LIMIT = 10**3
"""A run of unnormalised layers flags when the product of their factors is beyond this either way: the
attenuation GC001/GC002 call unhealthy by default."""

CONV_TYPES = frozenset({"Conv1d", "Conv2d", "Conv3d"})
RECURRENT_WEIGHT = re.compile(r"(^|\.)weight_(ih|hh|hr)(_l\d+(_reverse)?)?$")

TRAINED = "trained"
"""``looks_like`` of a weight whose entries are no longer i.i.d.: trained, whatever scale it has."""

UNSEEN = "unknown"
"""The activation of a layer that never ran as a module (``nn.MultiheadAttention.out_proj``)."""


@dataclass(frozen=True)
class _Weight:
    """One audited weight and what is intrinsic to its module."""

    layer: str
    module: str
    type: str
    tensor: torch.Tensor
    transposed: bool
    """Hugging Face ``Conv1D``: stored (in, out)."""
    recurrent: tuple[str, float, int] | None = None
    """RNN family: (activation, gain, hidden size)."""


@dataclass(frozen=True)
class _Run:
    """Consecutive unnormalised layers whose scales multiply."""

    members: tuple[InitLayer, ...]
    """The layers whose ratios compound (those beyond ``LAYER_LIMIT`` alone are left out)."""
    log10: float
    """log10 of the product of the members' ratios (parallel projections counted once)."""
    alone: tuple[InitLayer, ...] = ()
    """Layers of the stretch beyond ``LAYER_LIMIT`` on their own."""

    @property
    def product(self) -> float:
        return 10.0**self.log10


def audit_init(model: nn.Module, leaf_calls: Sequence[tuple[str, str]], *, trained: str | None = None) -> InitAudit:
    """Audit every Linear/Conv/RNN weight of ``model`` against the scale its activation needs.

    ``leaf_calls`` is every leaf-module call of a forward pass in order, as (name, class name); empty means
    hooks could not fire and the definition order stands in for it. ``trained`` (a reason) skips the flags.
    """
    weights = _collect(model)
    contexts = following(model, leaf_calls, {w.module for w in weights})
    order = {name: i for i, name in enumerate(contexts)}
    weights.sort(key=lambda w: order.get(w.module, len(order)))
    layers: list[InitLayer] = []
    looks_trained: list[tuple[str, str]] = []
    testable = 0
    every_stats = weight_stats_all([_matrix(weight) for weight in weights])
    for weight, stats in zip(weights, every_stats, strict=True):
        if stats is None:
            continue
        layer = _audit_weight(weight, stats, contexts.get(weight.module))
        evidence = None
        if layer.looks_like not in ("orthogonal", "zeros", "constant"):  # exact structures no optimiser leaves
            testable += 1
            evidence = trained_evidence(stats)
        if evidence is not None:
            looks_trained.append((layer.layer, evidence))
            layer = replace(layer, looks_like=TRAINED)  # a trained weight is no initialisation scheme
        layers.append(layer)
    trained_names = tuple(name for name, _ in looks_trained)
    if not layers:
        return InitAudit(layers=(), skipped=trained or "no Linear, Conv or recurrent weights to audit")
    skipped = trained
    if skipped is None and looks_trained and len(looks_trained) * 2 > max(testable, 1):
        name, why = looks_trained[0]
        skipped = (
            f"weights look trained: {len(looks_trained)} of {testable} layers are no longer i.i.d. like an "
            f"initialisation (first: {name}, {why})"
        )
    if skipped is not None:
        return InitAudit(layers=tuple(layers), skipped=skipped, trained_layers=trained_names)
    flags, _ = _judge(layers, set(trained_names))
    flagged = tuple(replace(layer, flag=flags.get(layer.layer)) for layer in layers)
    return InitAudit(layers=flagged, skipped=None, trained_layers=trained_names)


def audited_modules(model: nn.Module) -> set[str]:
    """Names of the modules whose weights the audit judges: where a scan for the activation after a weight ends."""
    return {weight.module for weight in _collect(model)}


def init_findings(audit: InitAudit) -> tuple[Finding, ...]:
    """One GC010 warning per direction (too small → vanishing, too large → exploding) from the audit's flags."""
    if audit.skipped is not None:
        return ()
    _, runs = _judge(audit.layers, set(audit.trained_layers))
    findings = []
    for flag, problem in (("too_small", Problem.VANISHING), ("too_large", Problem.EXPLODING)):
        flagged = [layer for layer in audit.layers if layer.flag == flag]
        if flagged:
            findings.append(_finding(flag, problem, flagged, runs))
    return tuple(findings)


# --- which weights ----------------------------------------------------------------------------------------


def _collect(model: nn.Module) -> list[_Weight]:
    """The audited weights in definition order, each tensor once (tied weights count for their first owner)."""
    found: list[_Weight] = []
    seen: set[object] = set()
    for name, module in model.named_modules():
        kind = module_type(module)
        candidates: list[tuple[str, object, bool, tuple[str, float, int] | None]] = []
        if kind in RECURRENT or isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            recurrent = _recurrent(module, kind)
            for pname, param in module.named_parameters(recurse=False):
                if pname.startswith("weight_"):
                    candidates.append((f"{name}.{pname}" if name else pname, param, False, recurrent))
        elif kind == "Conv1D":
            candidates.append((name, getattr(module, "weight", None), True, None))
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or kind in CONV_TYPES | {"Linear"}:
            candidates.append((name, getattr(module, "weight", None), False, None))
        for layer, tensor, transposed, recurrent_info in candidates:
            if not _auditable(tensor):
                continue
            assert isinstance(tensor, torch.Tensor)
            keys = _identity(tensor)
            if keys & seen:
                continue
            seen |= keys
            found.append(_Weight(layer, name, kind, tensor, transposed, recurrent_info))
    return found


def _auditable(tensor: object) -> bool:
    if not isinstance(tensor, torch.Tensor) or is_lazy(tensor):
        return False
    if tensor.is_meta or tensor.layout != torch.strided or tensor.is_quantized:
        return False
    return tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() > 0


def _identity(tensor: torch.Tensor) -> set[object]:
    """Keys under which a shared weight is recognised: the object, and where it lives in memory."""
    keys: set[object] = {id(tensor)}
    with contextlib.suppress(RuntimeError, NotImplementedError):  # tensor subclasses without storage
        keys.add((tensor.device.type, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())))
    return keys


def _recurrent(module: nn.Module, kind: str) -> tuple[str, float, int]:
    """(activation, gain, hidden size) of an RNN-family module: tanh/relu for plain cells, ``gates`` (1) else."""
    hidden = int(getattr(module, "hidden_size", 0) or 0)
    if kind in ("RNN", "RNNCell"):
        nonlinearity = str(getattr(module, "nonlinearity", "tanh"))
        if nonlinearity in ("tanh", "relu"):
            return nonlinearity, activation_gain(nonlinearity), hidden
    return "gates", 1.0, hidden


# --- one weight ------------------------------------------------------------------------------------------


def _matrix(weight: _Weight) -> torch.Tensor:
    """The weight as (fan-out side, fan-in side): Hugging Face ``Conv1D`` transposed, a convolution flattened."""
    tensor = weight.tensor.detach()
    if weight.transposed and tensor.dim() == 2:
        return tensor.t()
    return tensor.reshape(tensor.shape[0], -1)


def _audit_weight(weight: _Weight, stats: WeightStats, context: Follower | None) -> InitLayer:
    tensor = weight.tensor
    if weight.transposed and tensor.dim() == 2:
        fan_in, fan_out = tensor.shape[0], tensor.shape[1]
    else:
        receptive = math.prod(tensor.shape[2:])
        fan_in, fan_out = tensor.shape[1] * receptive, tensor.shape[0] * receptive
    hidden = None
    if weight.recurrent is not None:
        activation, gain, hidden = weight.recurrent
        normalised = False
    elif context is not None:
        activation, gain, normalised = context.activation, context.gain, context.normalised
    else:
        activation, gain, normalised = UNSEEN, 1.0, False
    xavier = gain * math.sqrt(2.0 / (fan_in + fan_out))
    kaiming = gain / math.sqrt(fan_in)
    return InitLayer(
        layer=weight.layer,
        type=weight.type,
        fan_in=fan_in,
        fan_out=fan_out,
        std=stats.std,
        activation=activation,
        gain=gain,
        xavier_std=xavier,
        kaiming_std=kaiming,
        ratio=stats.std / kaiming,
        looks_like=looks_like(stats, fan_in, fan_out, gain, hidden or None),
        normalised=normalised,
    )


# --- the rule --------------------------------------------------------------------------------------------


def _judge(layers: Sequence[InitLayer], trained: set[str]) -> tuple[dict[str, str], list[_Run]]:
    """Per-layer flags, and the runs whose ratios compound beyond ``COMPOUND_LIMIT``."""
    flags: dict[str, str] = {}
    beyond: list[_Run] = []
    limit = math.log10(COMPOUND_LIMIT)
    for run in _runs(layers, trained):
        flags.update({m.layer: "too_large" if gradient_factor(m) > 1.0 else "too_small" for m in run.alone})
        if run.log10 < -limit:
            beyond.append(run)
            flags.update({m.layer: "too_small" for m in run.members if gradient_factor(m) < 1.0})
        elif run.log10 > limit:
            beyond.append(run)
            flags.update({m.layer: "too_large" for m in run.members if gradient_factor(m) > 1.0})
    return flags, beyond


def _runs(layers: Sequence[InitLayer], trained: set[str]) -> list[_Run]:
    """Every stretch of unnormalised layers with the product of its layers' factors."""
    runs = []
    for chain in _chains(layers, trained):
        groups: list[list[InitLayer]] = []
        alone = []
        for layer in chain:
            if not 1.0 / LAYER_LIMIT <= gradient_factor(layer) <= LAYER_LIMIT:
                alone.append(layer)
            elif groups and _parallel(groups[-1][-1], layer):
                groups[-1].append(layer)
            else:
                groups.append([layer])
        log10 = sum(statistics.fmean(math.log10(gradient_factor(m)) for m in group) for group in groups)
        runs.append(_Run(tuple(m for group in groups for m in group), log10, tuple(alone)))
    return runs


def gradient_factor(layer: InitLayer) -> float:
    """What the layer multiplies the gradient by beyond its activation's need: the ratio, except for tanh.

    tanh passes small signals at slope 1 and its calculate_gain (5/3) is for unit-variance inputs: a tanh
    layer below LeCun's scale (std·√fan_in < 1) shrinks the signal by std·√fan_in, one above 5/3 grows it
    by the ratio, and anything between (LeCun, Xavier, 5/3) keeps it.
    """
    if layer.activation == "tanh":
        scale = layer.ratio * layer.gain
        return scale if scale < 1.0 else max(layer.ratio, 1.0)
    return layer.ratio


def _chains(layers: Sequence[InitLayer], trained: set[str]) -> list[list[InitLayer]]:
    """Maximal stretches, in forward order, of layers whose scale carries on to the next one."""
    chains: list[list[InitLayer]] = []
    current: list[InitLayer] = []
    for layer in layers:
        if _chainable(layer, trained):
            current.append(layer)
            continue
        if current:
            chains.append(current)
        current = []
    if current:
        chains.append(current)
    return chains


def _chainable(layer: InitLayer, trained: set[str]) -> bool:
    """Unnormalised, feed-forward, ran in the pass, not trained, and with a scale (not zeros)."""
    return not (
        layer.normalised
        or RECURRENT_WEIGHT.search(layer.layer) is not None
        or layer.activation == UNSEEN
        or layer.layer in trained
        or layer.looks_like in ("zeros", "constant")
        or not layer.ratio > 0
    )


def _parallel(previous: InitLayer, layer: InitLayer) -> bool:
    """Projections of one attention module (query, key, value) side by side: their scales do not multiply."""
    parent, _, leaf = layer.layer.rpartition(".")
    other_parent, _, other_leaf = previous.layer.rpartition(".")
    return (
        parent == other_parent
        and bool(re.search("attn|attention", parent, re.IGNORECASE))
        and not leaf.isdigit()
        and not other_leaf.isdigit()
        and previous.activation == "linear"
        and previous.type == layer.type
        and previous.fan_in == layer.fan_in
    )


def _finding(flag: str, problem: Problem, flagged: list[InitLayer], runs: list[_Run]) -> Finding:
    small = flag == "too_small"
    alone = [
        m for m in flagged if (gradient_factor(m) < 1.0 / LAYER_LIMIT if small else gradient_factor(m) > LAYER_LIMIT)
    ]
    compounding = [r for r in runs if (r.log10 < 0) == small]
    worst = max(compounding, key=lambda r: abs(r.log10)) if compounding else None
    parts = []
    if worst is not None:
        members = worst.members
        names = {m.layer for m in flagged}
        off = [m for m in members if m.layer in names] or list(members)
        activation = Counter(m.activation for m in off).most_common(1)[0][0]
        looks = Counter(m.looks_like for m in off).most_common(1)[0][0]
        median_std = statistics.median(m.std for m in off)
        scheme = f"an unrecognised init (std {median_std:.3g})" if looks == "unknown" else f"{looks} init"
        tanh = activation == "tanh"
        per_layer = statistics.median(gradient_factor(m) for m in off)
        slope = f" ({per_layer:.2g}× at tanh's small-signal slope of 1)" if tanh and per_layer < 1.0 else ""
        parts.append(
            f"{activation} layers with {scheme}: {len(off)} of {len(members)} consecutive layers without normalisation "
            f"({members[0].layer} … {members[-1].layer}) sit at {statistics.median(m.ratio for m in off):.2g}× the "
            f"Kaiming scale{slope}, compounding to {worst.product:.2g} over the run"
        )
    if alone or not parts:
        first = (alone or flagged)[0]
        more = f" (and {len(alone) - 1} more beyond {LAYER_LIMIT:.3g}×)" if len(alone) > 1 else ""
        parts.append(
            f"{first.layer} ({first.type}, fan-in {first.fan_in}, then {first.activation}) has std {first.std:.3g}, "
            f"{first.ratio:.3g}× the Kaiming scale {first.kaiming_std:.3g} (looks like {first.looks_like}){more}"
        )
    direction = "too small" if small else "too large"
    message = f"initial weights are {direction} for their activations — " + "; ".join(parts) + f". {_fix(flagged)}"
    first = flagged[0]
    evidence: dict[str, object] = {
        "layers": [m.layer for m in flagged],
        "ratio": first.ratio,
        "looks_like": first.looks_like,
        "activation": first.activation,
        "single_layers": [m.layer for m in alone],
        "compounded": None if worst is None else worst.product,
        "run_length": None if worst is None else len(worst.members),
        "run_first": None if worst is None else worst.members[0].layer,
        "run_last": None if worst is None else worst.members[-1].layer,
        "layer_limit": LAYER_LIMIT,
        "compound_limit": COMPOUND_LIMIT,
    }
    return Finding(INIT_SCALE.code, INIT_SCALE.name, Severity.WARNING, problem, first.layer, message, evidence)


def _fix(flagged: list[InitLayer]) -> str:
    activation = Counter(m.activation for m in flagged).most_common(1)[0][0]
    if activation.startswith("leaky_relu"):
        call = f"nn.init.kaiming_normal_(w, a={activation[11:-1]}, nonlinearity='leaky_relu')"
    elif activation in ("tanh", "sigmoid", "linear"):
        call = f"nn.init.kaiming_normal_(w, nonlinearity='{activation}')"
    elif activation == "selu":
        call = "nn.init.kaiming_normal_(w, nonlinearity='linear'), LeCun's scale for SELU"
    else:
        call = "nn.init.kaiming_normal_(w, nonlinearity='relu')"
    return f"Re-initialise for the activation ({call}) or normalise the layers' outputs (BatchNorm/LayerNorm)"
