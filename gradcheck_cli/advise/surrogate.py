"""The optimisation probe's loss: a bounded surrogate where the batch has no target.

One probe may differentiate the random projection Σ⟨output, r⟩ (probe/loss.py): its gradient is that of a
typical loss. Optimiser steps on it have no minimum to reach: every step moves the output further along r,
and the gradient grows on any model, healthy or not (a trained MLP's total gradient norm: 11.8 → 3e5 in 8
SGD steps). The optimisation probe therefore minimises a loss with a minimum (docs/calibration.md, "The
optimisation probe's loss").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.loss import float_leaves, select_output
from gradcheck_cli.probe.measure import cuda_devices, kept_buffers, run_forward, set_mode
from gradcheck_cli.settings import ProbeSettings


def bounded_batch(work: nn.Module, batch: Batch, settings: ProbeSettings) -> tuple[Batch, str]:
    """``batch`` with a target where it has none, and the loss the steps minimise, in words.

    One probe may differentiate the random projection Σ⟨output, r⟩ (probe/loss.py), but steps on it have no
    minimum: every step moves the output further along r and the gradient grows without bound on any model.
    Without a target (and without the model's own loss) the steps minimise a bounded surrogate instead: the
    mean squared error towards a fixed random target drawn once, seeded, at the scale of the output it is
    compared with (its mean and standard deviation on ``work`` before the first step).
    """
    if batch.target is not None:
        return batch, "the loss of the batch's target"
    with torch.random.fork_rng(devices=cuda_devices(list(work.parameters()))), kept_buffers(work), torch.no_grad():
        torch.manual_seed(settings.seed)
        modes = [(m, m.training) for m in work.modules()]
        set_mode(work, settings.train)
        try:
            output = run_forward(work, batch, settings.seed)
        finally:
            for module, training in modes:
                module.training = training
    if _has_own_loss(output):
        return batch, "the model's own loss (output.loss)"
    picked = output if settings.loss_output is None else select_output(output, settings.loss_output)
    pred = next(float_leaves(picked), None)
    if pred is None:
        return batch, "the random projection (the output holds no floating-point tensor to aim at)"
    values = pred.detach().float()
    mean = float(values.mean())
    std = float(values.std()) if values.numel() > 1 else 0.0
    if not (math.isfinite(mean) and math.isfinite(std)):
        return batch, "the random projection (the output is not finite before the first step)"
    scale = std if std > 0 else 1.0
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    target = mean + scale * torch.randn(tuple(pred.shape), generator=generator)
    words = (
        f"{SURROGATE}: mean squared error towards a fixed random target drawn once (seed {settings.seed}) at "
        f"the output's mean {mean:.3g} and standard deviation {scale:.3g} (the batch has no target; the random "
        "projection one probe uses has no minimum, so steps on it would grow the gradient on any model)"
    )
    return dataclasses.replace(batch, target=target), words


SURROGATE = "bounded surrogate"
"""How the optimisation probe's loss is named when the batch has no target (docs/calibration.md)."""


def _has_own_loss(output: Any) -> bool:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return isinstance(loss, torch.Tensor) and loss.is_floating_point()
