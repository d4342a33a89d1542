"""The initialisation audit (GC010): every Linear/Conv/RNN weight's scale against what its activation needs.

For each weight: fans (``nn.init`` convention; Hugging Face ``Conv1D`` stores (in, out)), standard deviation,
the activation that follows it in the forward pass, its gain, the Xavier and Kaiming scales, the ratio
std / Kaiming (the factor the layer multiplies the gradient's norm by beyond what its activation needs)
and the scheme it looks like. A stack flags when one layer is beyond ``LAYER_LIMIT`` off, or when the
factors of a run of unnormalised layers compound beyond ``COMPOUND_LIMIT``. Weights that no longer look
like an initialisation (no longer i.i.d.: a singular value, norm spread or mean beyond sampling) are listed,
never flagged.
Statistics, thresholds and the calibration table: docs/init_audit.md.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from gradcheck_cli.diagnose.module_kinds import INIT_GAIN_NAME, RECURRENT
from gradcheck_cli.diagnose.rule_codes import INIT_SCALE
from gradcheck_cli.probe.modules import module_type
from gradcheck_cli.report.report import Finding, Problem, Severity
from gradcheck_cli.report.sections import InitAudit, InitLayer

__all__ = ["COMPOUND_LIMIT", "INIT_SCALE", "LAYER_LIMIT", "audit_init", "gradient_factor", "init_findings"]

LAYER_LIMIT = 10**1.5
"""One layer flags alone when its gradient factor is beyond this either way: no convention is that far off."""
COMPOUND_LIMIT = 10**3
"""A run of unnormalised layers flags when the product of their factors is beyond this either way: the
attenuation GC001/GC002 call unhealthy by default."""

TRAINED_Z = 6.0
"""Row/column norm spread this many standard errors beyond the i.i.d. expectation: not an initialisation."""
TRAINED_SPREAD = 1.5
"""... and at least this many times the i.i.d. expectation (an effect size, for very large matrices)."""
MEAN_Z = 6.0
"""A mean this many standard errors from zero (while within ``MEAN_DRIFT``): drifted by training."""
MEAN_DRIFT = 1.0
"""A mean beyond this many stds is an offset someone chose (``uniform_(w)``: 1.73), not a drift."""
MIN_VECTORS = 8
"""Rows (or columns) needed before their norms' spread is tested."""
MIN_ENTRIES = 4
"""Entries per row (or column) needed before its norm is tested."""
SPIKE_MARGIN = 2.0
"""Trained when the top singular value exceeds the i.i.d. edge by more than this × min(rows, cols)^(-2/3)."""
MIN_SPIKE_SIDE = 4
"""Rows and columns needed before the singular-value test."""
SPARSE_SHARE = 0.25
"""Weights with more exact zeros than this (``nn.init.sparse_``, pruning) skip the singular-value test."""
SPIKE_ENTRIES = 1 << 14
"""The singular-value test runs on evenly spaced rows holding about this many entries."""

SAMPLE_ENTRIES = 1 << 14
"""Larger weights are reduced on evenly spaced rows (and columns) holding about this many entries."""
ORTHOGONAL_VECTORS = 64
ORTHOGONAL_ENTRIES = 1 << 22
ORTHOGONAL_TOLERANCE = 0.1
"""Orthogonal when √length·max|G/c − I| is below this (i.i.d. weights give about 1 and more)."""

CONV_TYPES = frozenset({"Conv1d", "Conv2d", "Conv3d"})
NORM_PATTERN = re.compile(r"Norm(\d+d)?$")
RECURRENT_WEIGHT = re.compile(r"(^|\.)weight_(ih|hh|hr)(_l\d+(_reverse)?)?$")

# Gains nn.init.calculate_gain does not know: 1/√E[φ'(z)²] for z ~ N(0, 1), the factor that keeps the
# gradient's second moment through the activation (√2 for ReLU, where it agrees with calculate_gain).
DERIVED_GAINS = {
    "gelu": 1.481,
    "silu": 1.623,
    "mish": 1.445,
    "elu": 1.223,
    "hardswish": 1.670,
    "softplus": 1.846,
}
# Hugging Face and custom activation classes (NewGELUActivation, SiLUActivation...), by name; order matters
NAMED_ACTIVATIONS = (
    ("gelu", "gelu"),
    ("silu", "silu"),
    ("swish", "silu"),
    ("mish", "mish"),
    ("sigmoid", "sigmoid"),
    ("tanh", "tanh"),
    ("relu", "relu"),
    ("elu", "elu"),
)
DISTINCT_NAMES = frozenset({"gelu", "silu", "swish", "mish"})
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
class _Context:
    """What follows a module in the forward pass."""

    activation: str
    gain: float
    normalised: bool


@dataclass(frozen=True)
class _Stats:
    """Simple reductions of one weight (on a row sample for large ones)."""

    std: float
    """√mean(w²): the standard deviation of the zero-mean distribution an initialisation draws from."""
    constant: bool
    """Every entry the same non-zero value (``nn.init.constant_``)."""
    spread: float | None
    """Largest of (observed / i.i.d.-expected) CV of row and of column squared norms."""
    spread_z: float | None
    """That excess in standard errors of the CV estimate."""
    mean_z: float
    mean_share: float
    """|mean| / standard deviation about the mean."""
    orthogonal: bool
    entries: int
    spike: float | None = None
    """Top singular value of the centred weight over the i.i.d. edge std·(√rows + √cols)."""
    spike_limit: float = math.inf
    """Where ``spike`` stops being i.i.d. sampling for this shape."""


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
    contexts = _contexts(model, leaf_calls, {w.module for w in weights})
    order = {name: i for i, name in enumerate(contexts)}
    weights.sort(key=lambda w: order.get(w.module, len(order)))
    layers: list[InitLayer] = []
    looks_trained: list[tuple[str, str]] = []
    testable = 0
    for weight in weights:
        audited = _audit_weight(weight, contexts.get(weight.module))
        if audited is None:
            continue
        layer, stats = audited
        layers.append(layer)
        if layer.looks_like in ("orthogonal", "zeros", "constant"):
            continue  # exact structures no optimiser leaves behind
        testable += 1
        evidence = _trained_evidence(stats)
        if evidence is not None:
            looks_trained.append((layer.layer, evidence))
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
            return nonlinearity, _gain(nonlinearity), hidden
    return "gates", 1.0, hidden


# --- what follows each layer -----------------------------------------------------------------------------


def _contexts(model: nn.Module, leaf_calls: Sequence[tuple[str, str]], weighted: set[str]) -> dict[str, _Context]:
    """Per audited module, in order of first call: the first activation after it and whether a norm follows.

    The scan runs from the module's first call to the next call of any audited module. Recurrent modules
    are listed (they end scans) but their activation is intrinsic.
    """
    modules = dict(model.named_modules())
    calls = list(leaf_calls) or [
        (name, module_type(m)) for name, m in modules.items() if next(m.children(), None) is None
    ]
    first: dict[str, int] = {}
    for position, (name, _) in enumerate(calls):
        first.setdefault(name, position)
    contexts: dict[str, _Context] = {}
    for name in sorted((n for n in weighted if n in first), key=lambda n: first[n]):
        activation: tuple[str, float] | None = None
        normalised = False
        for other, kind in itertools.islice(calls, first[name] + 1, None):
            if other in weighted:
                break
            if activation is None:
                activation = _activation(modules.get(other), kind)
            normalised = normalised or _is_norm(kind)
        act, gain = activation or ("linear", 1.0)
        contexts[name] = _Context(act, gain, normalised)
    return contexts


def _activation(module: nn.Module | None, kind: str) -> tuple[str, float] | None:
    """(name, gain) when ``kind`` is an activation module, else None."""
    if kind in ("LeakyReLU", "PReLU", "RReLU"):
        slope = _slope(module, kind)
        return f"leaky_relu({slope:.3g})", nn.init.calculate_gain("leaky_relu", slope)
    name = INIT_GAIN_NAME.get(kind) or _named_activation(kind.lower())
    return None if name is None else (name, _gain(name))


def _named_activation(lowered: str) -> str | None:
    """Hugging Face and custom classes: a distinctive name anywhere (``NewGELUActivation``), a generic one
    (relu, tanh...) at the end of the name or before ``Activation`` (``ScaledTanh``, ``ReLUSquaredActivation``).
    """
    named = lowered.endswith(("activation", "act"))
    for pattern, activation in NAMED_ACTIVATIONS:
        if pattern in lowered and (pattern in DISTINCT_NAMES or named or lowered.endswith(pattern)):
            return activation
    return None


def _gain(name: str) -> float:
    gains = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "sigmoid": 1.0, "selu": 0.75, "linear": 1.0}
    return DERIVED_GAINS.get(name) or gains[name]  # the latter as nn.init.calculate_gain gives them


def _slope(module: nn.Module | None, kind: str) -> float:
    try:
        if kind == "LeakyReLU":
            return float(getattr(module, "negative_slope", 0.01))
        if kind == "RReLU":
            return (float(getattr(module, "lower", 1 / 8)) + float(getattr(module, "upper", 1 / 3))) / 2
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta and weight.numel():
            value = float(weight.detach().float().mean())
            if math.isfinite(value):
                return value
    except (TypeError, ValueError, RuntimeError):
        pass
    return 0.25 if kind == "PReLU" else 0.01


def _is_norm(kind: str) -> bool:
    return bool(NORM_PATTERN.search(kind)) and not kind.startswith("Frozen")


# --- one weight ------------------------------------------------------------------------------------------


def _audit_weight(weight: _Weight, context: _Context | None) -> tuple[InitLayer, _Stats] | None:
    tensor = weight.tensor.detach()
    if weight.transposed and tensor.dim() == 2:
        matrix = tensor.t()
        fan_in, fan_out = tensor.shape[0], tensor.shape[1]
    else:
        matrix = tensor.reshape(tensor.shape[0], -1)
        receptive = math.prod(tensor.shape[2:])
        fan_in, fan_out = tensor.shape[1] * receptive, tensor.shape[0] * receptive
    stats = _stats(matrix)
    if stats is None:
        return None
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
    layer = InitLayer(
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
        looks_like=_looks_like(stats, fan_in, fan_out, gain, hidden or None),
        normalised=normalised,
    )
    return layer, stats


def _stats(matrix: torch.Tensor) -> _Stats | None:
    """Moments, row/column norm spread and orthogonality; None when the sampled entries hold NaN/Inf (the probe
    reports non-finite weights itself)."""
    rows, cols = matrix.shape
    sample = matrix
    if rows * cols > SAMPLE_ENTRIES:
        width = min(cols, SAMPLE_ENTRIES // MIN_VECTORS)
        keep = max(MIN_VECTORS, SAMPLE_ENTRIES // width)
        if rows > keep:  # rows first: the column gather then touches only the kept rows
            sample = sample[_evenly(rows, keep, matrix.device)]
        if cols > width:
            sample = sample[:, _evenly(cols, width, matrix.device)]
    x = sample.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        return None
    squares = x.square()
    entries = x.numel()
    mean = float(x.mean())
    second = float(squares.mean())
    fourth = float(squares.square().mean())
    rms = math.sqrt(second)
    std = math.sqrt(float((x - mean).square().mean()))  # about the mean: exactly 0 for a constant
    if rms == 0.0 or (entries > 1 and std <= 1e-12 * rms):
        return _Stats(rms, rms > 0.0, None, None, 0.0, math.inf, False, entries)
    kurtosis = fourth / (second * second)
    tests = [
        _spread(squares.sum(dim=1), x.shape[1], kurtosis),
        _spread(squares.sum(dim=0), x.shape[0], kurtosis),
    ]
    valid = [t for t in tests if t is not None]
    spread = max((t[0] for t in valid), default=None)
    spread_z = max((t[1] for t in valid), default=None)
    mean_z = abs(mean) * math.sqrt(entries) / math.sqrt(second)  # ≤ √entries: tiny weights cannot trip it
    spike, limit = None, math.inf
    if std > 0.0 and float((x == 0).double().mean()) < SPARSE_SHARE:
        centred = x if entries <= SPIKE_ENTRIES else x[_evenly(x.shape[0], max(1, SPIKE_ENTRIES // x.shape[1]))]
        side = min(centred.shape)
        if side >= MIN_SPIKE_SIDE:
            top = _top_singular((centred - mean).float())
            spike = top / (std * (math.sqrt(centred.shape[0]) + math.sqrt(centred.shape[1])))
            limit = 1.0 + SPIKE_MARGIN * side ** (-2.0 / 3.0)
    share = abs(mean) / std if std > 0.0 else math.inf
    return _Stats(rms, False, spread, spread_z, mean_z, share, _orthogonal(matrix), entries, spike, limit)


def _top_singular(x: torch.Tensor) -> float:
    """The largest singular value, exactly: √ of the top eigenvalue of the Gram matrix on the shorter side."""
    short = (x if x.shape[0] <= x.shape[1] else x.t()).double()
    gram = short @ short.t()
    if not bool(torch.isfinite(gram).all()):
        return math.inf
    return math.sqrt(max(0.0, float(torch.linalg.eigvalsh(gram)[-1])))


def _evenly(n: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """``k`` evenly spaced distinct indices in ``range(n)``."""
    return (torch.arange(k, device=device) * n) // k


def _spread(squared_norms: torch.Tensor, per: int, kurtosis: float) -> tuple[float, float] | None:
    """(observed / expected CV of the squared norms, its excess in standard errors) for i.i.d. entries.

    ``per`` i.i.d. entries with kurtosis κ (about zero) give squared norms with CV √((κ−1)/per); the CV of
    ``count`` such norms is estimated within about 1/√(2(count−1)) of itself (more for few entries per norm).
    """
    count = squared_norms.numel()
    if count < MIN_VECTORS or per < MIN_ENTRIES or kurtosis <= 1.0 + 1e-9:
        return None
    centre = float(squared_norms.mean())
    if centre <= 0:
        return None
    observed = float(squared_norms.std()) / centre
    expected = math.sqrt((kurtosis - 1.0) / per)
    ratio = observed / expected
    z = (ratio - 1.0) * math.sqrt(2.0 * (count - 1)) / math.sqrt(1.0 + 6.0 / per)
    return ratio, z


def _orthogonal(matrix: torch.Tensor) -> bool:
    """Whether the shorter side's vectors are orthogonal and of equal norm (W Wᵀ ∝ I), on up to 64 of them."""
    vectors = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.t()
    count, length = vectors.shape
    if count < 2:
        return False
    keep = min(count, ORTHOGONAL_VECTORS)
    if keep * length > ORTHOGONAL_ENTRIES:
        return False
    a = vectors[_evenly(count, keep, vectors.device)].to(device="cpu", dtype=torch.float32)
    gram = (a @ a.t()).double()  # float32 products are far inside the 0.1/√length tolerance
    scale = float(gram.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        return False
    deviation = float((gram / scale - torch.eye(keep, dtype=torch.float64)).abs().max())
    return deviation * math.sqrt(length) < ORTHOGONAL_TOLERANCE


def _looks_like(stats: _Stats, fan_in: int, fan_out: int, gain: float, hidden: int | None) -> str:
    """The known scheme whose std is nearest in log distance, within sampling tolerance; else ``unknown``."""
    if stats.std == 0.0:
        return "zeros"
    if stats.constant:
        return "constant"
    if stats.orthogonal:
        return "orthogonal"
    candidates = [("pytorch_default", 1.0 / math.sqrt(3.0 * (hidden or fan_in))), ("kaiming", math.sqrt(2.0 / fan_in))]
    if not (math.isclose(gain, 1.0) or math.isclose(gain, math.sqrt(2.0))):
        candidates.append(("kaiming", gain / math.sqrt(fan_in)))
    if fan_out != fan_in:
        candidates.append(("kaiming_fan_out", math.sqrt(2.0 / fan_out)))
    xavier = math.sqrt(2.0 / (fan_in + fan_out))
    candidates.append(("xavier", xavier))
    if not math.isclose(gain, 1.0):
        candidates.append(("xavier", gain * xavier))
    candidates += [("lecun", 1.0 / math.sqrt(fan_in)), ("normal_0.02", 0.02)]
    # nearest first; exact ties (Xavier and LeCun on square layers) go to the earlier entry
    distances = [round(abs(math.log(stats.std / std)), 9) for _, std in candidates]
    best = distances.index(min(distances))
    tolerance = math.log(1.15) + 3.0 / math.sqrt(2.0 * stats.entries)
    return candidates[best][0] if distances[best] < tolerance else "unknown"


def _trained_evidence(stats: _Stats) -> str | None:
    """Why the weight no longer looks like an initialisation, or None."""
    if stats.spike is not None and stats.spike > stats.spike_limit:
        return f"top singular value {stats.spike:.3g}× the i.i.d. edge"
    spread, z = stats.spread, stats.spread_z
    if spread is not None and z is not None and z > TRAINED_Z and spread > TRAINED_SPREAD:
        return f"row/column norms spread {stats.spread:.3g}× the i.i.d. expectation"
    if stats.mean_z > MEAN_Z and stats.mean_share <= MEAN_DRIFT:
        return f"mean {stats.mean_share:.2g} std from zero"
    return None


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
