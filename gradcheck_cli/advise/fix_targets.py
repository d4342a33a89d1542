"""What the in-memory fixes change: the Linear/Conv layers, and the activation after each.

Which activation follows a weight is :mod:`gradcheck_cli.diagnose.following`'s decision, the same one the
init audit reports: the probe's traced forward pass where the verification passes it on
(:data:`SEEN_IN_FORWARD`, the audit's ``activation`` per layer), the modules' definition order otherwise.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn

from gradcheck_cli.diagnose.following import Nonlinearity, following, init_nonlinearity
from gradcheck_cli.diagnose.init_audit import audited_modules


class NotApplicable(Exception):
    """The fix does not apply to this model; ``str(error)`` says why in plain words."""


WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
WeightLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
LINEAR: Nonlinearity = ("linear", 0.0)

SEEN_IN_FORWARD: ContextVar[dict[str, str] | None] = ContextVar("gradcheck_seen_in_forward", default=None)
"""Layer name → the activation that followed it in the probe's forward pass (the init audit's), when known."""


def weight_layers(model: nn.Module) -> list[tuple[str, WeightLayer]]:
    """Linear and Conv1d/2d/3d layers with a materialised weight, in definition order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, WEIGHT_LAYERS)
        and not isinstance(m.weight, nn.parameter.UninitializedParameter)
        and not nn.utils.parametrize.is_parametrized(m, "weight")  # weight_norm/spectral_norm: computed weights
    ]


def following_activations(model: nn.Module) -> dict[int, Nonlinearity]:
    """For each Linear/Conv layer (by ``id``), the ``nn.init`` nonlinearity of the activation after it.

    The traced forward pass (:data:`SEEN_IN_FORWARD`) wins; a layer it did not see as a module
    (``unknown``) gets the definition order's answer, and ``linear`` where no activation follows.
    """
    seen = SEEN_IN_FORWARD.get() or {}
    in_order = following(model, (), audited_modules(model))
    found: dict[int, Nonlinearity] = {}
    for name, layer in weight_layers(model):
        traced = init_nonlinearity(seen[name]) if name in seen else None
        ordered = init_nonlinearity(in_order[name].activation) if name in in_order else None
        found[id(layer)] = traced or ordered or LINEAR
    return found


def zero_bias(module: nn.Module) -> bool:
    """Zero the module's bias, if it has one; whether it had."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        nn.init.zeros_(bias)
        return True
    return False


def count(n: int, what: str) -> str:
    """``1 Linear/Conv weight``, ``3 Linear/Conv weights``, ``2 recurrent weight_hh matrices``."""
    if n == 1:
        return f"1 {what}"
    return f"{n} {what[:-1] + 'ces' if what.endswith('matrix') else what + 's'}"
