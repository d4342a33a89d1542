"""What follows each weight in the forward pass: the first activation before the next weight, and whether a
normalisation comes between. Decided here once for the init audit (the report's ``activation``) and the
in-memory fixes (the gain they initialise with).

The traced leaf-module calls of the probe's forward pass are the truth: they see a shared activation module
and the order modules actually run in. Where hooks could not fire, the leaf modules' definition order stands
in for them. Which classes are activations, and their ``nn.init`` gains, come from
:mod:`gradcheck_cli.diagnose.module_kinds`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradcheck_cli.diagnose.module_kinds import INIT_GAIN_NAME, LEAKY_RELU_LIKE
from gradcheck_cli.probe.modules import module_type

DERIVED_GAINS = {
    "gelu": 1.481,
    "silu": 1.623,
    "mish": 1.445,
    "elu": 1.223,
    "hardswish": 1.670,
    "softplus": 1.846,
}
"""Gains ``nn.init.calculate_gain`` does not know: 1/√E[φ'(z)²] for z ~ N(0, 1), the factor that keeps the
gradient's second moment through the activation (√2 for ReLU, where it agrees with ``calculate_gain``)."""
CALCULATE_GAIN = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "sigmoid": 1.0, "selu": 0.75, "linear": 1.0}
"""The gains ``nn.init.calculate_gain`` gives the names it knows."""
INIT_NONLINEARITY = {name: "relu" for name in DERIVED_GAINS} | {name: name for name in CALCULATE_GAIN}
"""Activation name → the ``nonlinearity`` the fixes pass to ``nn.init`` (ReLU-like ones initialise as ReLU)."""
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
"""Hugging Face and custom activation classes (``NewGELUActivation``, ``SiLUActivation``...), by name; order
matters."""
DISTINCT_NAMES = frozenset({"gelu", "silu", "swish", "mish"})
NORM_PATTERN = re.compile(r"Norm(\d+d)?$")
LEAKY = re.compile(r"leaky_relu\((.+)\)$")

Nonlinearity = tuple[str, float]
"""A name ``nn.init.calculate_gain`` knows, and the negative slope for ``leaky_relu``."""


@dataclass(frozen=True)
class Follower:
    """What follows one weight in the forward pass."""

    activation: str
    """The activation's name as the report shows it (``relu``, ``gelu``, ``leaky_relu(0.01)``, ``linear``)."""
    gain: float
    """Its ``nn.init.calculate_gain`` (or derived gain, :data:`DERIVED_GAINS`)."""
    normalised: bool
    """A normalisation layer runs before the next weight."""


def following(model: nn.Module, leaf_calls: Sequence[tuple[str, str]], weighted: set[str]) -> dict[str, Follower]:
    """Per module in ``weighted``, in order of first call: the first activation after it, and whether a norm
    follows.

    ``leaf_calls`` is every leaf-module call of a forward pass in order, as (name, class name); empty means
    hooks could not fire and the leaf modules' definition order stands in. The scan runs from the module's
    first call to the next call of any module in ``weighted``; none found means ``linear``.
    """
    modules = dict(model.named_modules())
    calls = list(leaf_calls) or [
        (name, module_type(m)) for name, m in modules.items() if next(m.children(), None) is None
    ]
    first: dict[str, int] = {}
    for position, (name, _) in enumerate(calls):
        first.setdefault(name, position)
    found: dict[str, Follower] = {}
    for name in sorted((n for n in weighted if n in first), key=lambda n: first[n]):
        activation: tuple[str, float] | None = None
        normalised = False
        for other, kind in itertools.islice(calls, first[name] + 1, None):
            if other in weighted:
                break
            if activation is None:
                activation = _activation(modules.get(other), kind)
            normalised = normalised or is_norm(kind)
        act, gain = activation or ("linear", 1.0)
        found[name] = Follower(act, gain, normalised)
    return found


def is_activation(kind: str) -> bool:
    """Whether a module class is an activation (the module-kinds table, or a Hugging Face/custom name)."""
    return kind in LEAKY_RELU_LIKE or kind in INIT_GAIN_NAME or _named_activation(kind.lower()) is not None


def is_norm(kind: str) -> bool:
    """Whether a module class is a normalisation layer (frozen ones, as in torchvision, hold fixed statistics)."""
    return bool(NORM_PATTERN.search(kind)) and not kind.startswith("Frozen")


def init_nonlinearity(activation: str) -> Nonlinearity | None:
    """The ``nn.init`` nonlinearity of a :attr:`Follower.activation`; None for ``unknown`` or ``gates``."""
    leaky = LEAKY.match(activation)
    if leaky is not None:
        return "leaky_relu", float(leaky.group(1))
    name = INIT_NONLINEARITY.get(activation)
    return None if name is None else (name, 0.0)


def activation_gain(name: str) -> float:
    """The gain of an activation name: ``calculate_gain``'s, or the derived one."""
    return DERIVED_GAINS.get(name) or CALCULATE_GAIN[name]


def _activation(module: nn.Module | None, kind: str) -> tuple[str, float] | None:
    """(name, gain) when ``kind`` is an activation module, else None."""
    if kind in LEAKY_RELU_LIKE:
        slope = _slope(module, kind)
        return f"leaky_relu({slope:.3g})", nn.init.calculate_gain("leaky_relu", slope)
    name = INIT_GAIN_NAME.get(kind) or _named_activation(kind.lower())
    return None if name is None else (name, activation_gain(name))


def _named_activation(lowered: str) -> str | None:
    """Hugging Face and custom classes: a distinctive name anywhere (``NewGELUActivation``), a generic one
    (relu, tanh...) at the end of the name or before ``Activation`` (``ScaledTanh``, ``ReLUSquaredActivation``).
    """
    named = lowered.endswith(("activation", "act"))
    for pattern, activation in NAMED_ACTIVATIONS:
        if pattern in lowered and (pattern in DISTINCT_NAMES or named or lowered.endswith(pattern)):
            return activation
    return None


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
