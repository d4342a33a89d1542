"""Activation-gradient hooks that exist only inside a ``with`` block."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradcheck_cli.loss import float_leaves


def norm_and_max_abs(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm and max |element| as 0-dim device tensors, without a sync.

    ``aminmax`` propagates NaN and costs about as much as the norm, where ``ord=inf`` would
    first materialise ``abs()``. A NaN or Inf element makes the max non-finite; an L2 norm
    that overflows float32 while the max stays finite means a huge but finite gradient.
    """
    low, high = torch.aminmax(tensor)
    return torch.linalg.vector_norm(tensor), torch.maximum(high, low.neg())


class ActivationGradientRecorder:
    """Records ‖∂L/∂output‖ of every call of the given modules, on the device, without syncing.

    A forward hook registers a tensor hook on each floating-point output; this works with
    ``nn.ReLU(inplace=True)``, where ``register_full_backward_hook`` raises. Every call is kept
    in order, so a cell run 200 times in a loop yields 200 records. The hooks hold no reference
    to activations, and all of them are removed when the block exits, even after an exception.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self._modules = modules
        self._stack = contextlib.ExitStack()
        self.calls: list[tuple[int, int]] = []
        """(module index, call index of that module) per forward call, in forward order."""
        self.norms: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        """Per call: (L2 norm, max |g|) of each output's gradient, as 0-dim device tensors."""
        self._calls_per_module = [0] * len(modules)

    def __enter__(self) -> ActivationGradientRecorder:
        try:
            for index, module in enumerate(self._modules):
                self._stack.enter_context(module.register_forward_hook(self._forward_hook(index)))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _forward_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            call_id = len(self.calls)
            self.calls.append((index, self._calls_per_module[index]))
            self._calls_per_module[index] += 1
            self.norms.append([])
            for tensor in float_leaves(output):
                if tensor.requires_grad:
                    handle: RemovableHandle = tensor.register_hook(self._grad_hook(call_id))
                    self._stack.callback(handle.remove)

        return hook

    def _grad_hook(self, call_id: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if grad.numel():
                self.norms[call_id].append(norm_and_max_abs(grad))

        return hook
