"""The backward path of a model whose module hooks cannot fire (TorchScript), seen through its bias gradients.

A bias is added to every row (and position) of its layer's output, so its gradient is that output's gradient
summed over the batch: ∂L/∂b = Σᵢ ∂L/∂yᵢ. It follows the backward signal δ from layer to layer as ‖∂L/∂y‖ does.
‖∂L/∂W‖ does not: it is Σᵢ δᵢ xᵢᵀ, and in a linear or ReLU stack δ grows by the gain per layer towards the input
while the layer input x shrinks by it, so an exploding stack keeps ‖∂L/∂W‖ level (docs/calibration.md,
"Programs: TorchScript and torch.export"). ``torch.export`` programs need none of this: the loader restores
their module hierarchy (load/exported.py) and module hooks fire on it.

:class:`BiasGradientRecorder` stands where :class:`~gradcheck_cli.probe.recorder.ActivationGradientRecorder`
stands in the probe (a subclass: the same attributes, filled during backward): one "call" per layer that owns
a bias, in definition order (a TorchScript module does not tell its call order), its norm
‖∂L/∂b‖. Layers without a bias are not measured; with fewer than two measured, diagnosis says that the path
could not be measured (diagnose/program_signal.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradcheck_cli.probe.modules import module_type
from gradcheck_cli.probe.norms import norm_and_max_abs
from gradcheck_cli.probe.recorder import ActivationGradientRecorder

BIAS = "bias"
"""The parameter name of an additive per-output term (Linear, Conv*, BatchNorm*, LayerNorm, GroupNorm…)."""


CENTRING_NORMS = ("BatchNorm", "SyncBatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm")
"""Normalisations that subtract a mean: a bias right before one gets no gradient (Σᵢ∂L/∂yᵢ = 0 for BatchNorm:
its output does not change when a channel shifts), so it says nothing about the path. The norm's own bias does."""


def _centred(module: nn.Module) -> bool:
    return module_type(module).startswith(CENTRING_NORMS)


def output_bias(module: nn.Module) -> nn.Parameter | None:
    """The module's own bias: a floating-point parameter named ``bias`` (RNNs' ``bias_ih_l0`` are per gate and
    per step, not an output's gradient, and are left out)."""
    bias = dict(module.named_parameters(recurse=False)).get(BIAS)
    if bias is None or not bias.is_floating_point() or bias.dim() != 1:
        return None
    return bias


class BiasGradientRecorder(ActivationGradientRecorder):
    """The recorder for a model whose module hooks cannot fire: one "call" per layer that owns a bias, in
    definition order, whose norm is ‖∂L/∂b‖, recorded by a tensor hook on the bias during backward (a layer
    whose bias got no gradient keeps an empty call, read as None, as an output that got none). A bias right
    before a mean-centring normalisation (:data:`CENTRING_NORMS`, next in definition order) is left out.

    ``modules``: the probe's parametrised modules, in definition order (their indices are the layer indices).
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__([], samples=False)
        followed = [*modules[1:], None]  # the next parametrised module in definition order (conv → BatchNorm)
        self._biases = [
            (index, bias)
            for index, (m, after) in enumerate(zip(modules, followed, strict=True))
            if (bias := output_bias(m)) is not None and not (after is not None and _centred(after))
        ]
        self.calls = [(index, 0) for index, _ in self._biases]
        self.norms = [[] for _ in self._biases]
        self.samples = [[] for _ in self._biases]

    def _register(self) -> None:
        for call_id, (_, bias) in enumerate(self._biases):
            if bias.requires_grad:
                self._watch(bias, self._bias_hook(call_id))

    def _bias_hook(self, call_id: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if grad is not None and grad.numel() and not grad.is_sparse:
                self.norms[call_id].append(norm_and_max_abs(grad))
                self.backward_order.append(call_id)

        return hook


def recorder_for(modules: list[nn.Module], hooks: bool, **options: Any) -> ActivationGradientRecorder:
    """The probe's recorder: ‖∂L/∂output‖ through module hooks where they fire (``options`` go to
    :class:`~gradcheck_cli.probe.recorder.ActivationGradientRecorder`), else the bias gradients."""
    if hooks:
        return ActivationGradientRecorder(modules, **options)
    return BiasGradientRecorder(modules)
