"""In-memory fixes: each one changes a copy of the model the way a recommendation's snippet would.

Every fix takes the copy, mutates it in place and returns what it did in plain words, or raises
:class:`NotApplicable` with the reason. None of them is ever given the user's model:
:mod:`gradcheck_cli.advise.verify` deep-copies it first, sets :data:`SEEN_IN_FORWARD`, seeds the random
initialisers and re-probes. This module is their registry; the fixes live in
:mod:`~gradcheck_cli.advise.init_fixes` (weights and activations) and
:mod:`~gradcheck_cli.advise.structure_fixes` (norms and shortcuts), what they change in
:mod:`~gradcheck_cli.advise.fix_targets`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradcheck_cli.advise.fix_targets import SEEN_IN_FORWARD, NotApplicable
from gradcheck_cli.advise.init_fixes import (
    activation_change,
    forget_gate_bias,
    kaiming_init,
    orthogonal_init,
    xavier_init,
)
from gradcheck_cli.advise.structure_fixes import batch_norm, layer_norm, residual

__all__ = ["FIXES", "SEEN_IN_FORWARD", "UNVERIFIABLE", "NotApplicable", "clip_gradients"]


def clip_gradients(model: nn.Module, max_norm: float) -> tuple[float, float]:
    """``clip_grad_norm_`` on the gradients already in ``.grad``; (total norm before, after)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise NotApplicable("no parameter of the copy received a gradient to clip")
    before = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    after = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))
    return before, after


FIXES: dict[str, Callable[[nn.Module], str]] = {
    "kaiming_init": kaiming_init,
    "xavier_init": xavier_init,
    "orthogonal_init": orthogonal_init,
    "activation_change": activation_change,
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "residual": residual,
    "forget_gate_bias": forget_gate_bias,
}
"""Recommendation id → the fix that changes the model in memory (``gradient_clipping`` is separate)."""

UNVERIFIABLE: dict[str, str] = {
    "lstm_gru": "replacing the cell changes the module's outputs and parameters, so the same probe cannot compare "
    "them; build the LSTM/GRU model and run gradcheck on it",
    "lower_lr": "the learning rate acts only across optimiser steps; see the optimisation probe (--steps N)",
    "weight_decay": "weight decay acts only across optimiser steps; see the optimisation probe (--steps N)",
    "reconnect_graph": "the cut is in the model's forward code (.detach(), no_grad, .item()), which cannot be "
    "rewritten in memory",
    "mixed_precision_scaling": "a GradScaler or bf16 changes the training step, not the model, so a copy has "
    "nothing to change; the precision section shows what fp16 loses with and without the recommended scale",
}
"""Recommendation id → why one pass cannot verify it."""
