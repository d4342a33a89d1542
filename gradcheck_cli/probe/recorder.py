"""Activation-gradient hooks that exist only inside a ``with`` block."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradcheck_cli.probe.loss import float_leaves
from gradcheck_cli.probe.norms import max_abs, norm_and_max_abs
from gradcheck_cli.probe.precision import sample


def broadcast_over_batch(grad: torch.Tensor, rows: int, module: nn.Module) -> bool:
    """Whether an output is shared by the whole batch rather than one row per sample (a rank's slice has
    ``rows`` samples): a scalar; a leading size of 1 ((1, T, H) position embeddings) unless it is a recurrent
    module's state ((layers, B, H)); no dimension of the slice's size at all ((T, H) position embeddings)."""
    if grad.dim() == 0:
        return True
    if isinstance(module, nn.RNNBase) or grad.shape[0] == rows:
        return False
    if grad.shape[0] == 1:
        return True
    return rows not in grad.shape[1:]


_Hooks = TypeVar("_Hooks", bound="HookStack")


class HookStack:
    """Hooks that exist only inside a ``with`` block: :meth:`_register` adds them to ``self._stack``; they are all
    removed when the block exits, and at once if registering one of them fails."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def _register(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Hooks) -> _Hooks:
        try:
            self._register()
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


class ActivationGradientRecorder(HookStack):
    """Records ‖∂L/∂output‖ of every call of the given modules, on the device, without syncing.

    A forward hook registers a tensor hook on each floating-point output; this works with
    ``nn.ReLU(inplace=True)``, where ``register_full_backward_hook`` raises. Every call is kept
    in order, so a cell run 200 times in a loop yields 200 records. For fused recurrent modules
    (``nn.RNN``/``nn.LSTM``/``nn.GRU``), which run a whole sequence in one call, the gradient
    reaching each time step's input is recorded too: that is the gradient through time. The
    hooks hold no reference to activations, and all of them are removed when the block exits,
    even after an exception.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        *,
        samples: bool = True,
        outputs: bool = False,
        batch_rows: int | None = None,
        graph: bool = False,
    ) -> None:
        super().__init__()
        self._modules = modules
        self._keep_nodes = graph
        self._keep_samples = samples
        self._keep_outputs = outputs
        self.rows = batch_rows
        """Samples in this rank's slice of the batch (under DDP/FSDP), or None."""
        self.shared: dict[tuple[int, int], torch.Tensor] = {}
        """With ``batch_rows`` (a rank's slice under DDP/FSDP): copies of the gradients of outputs broadcast over
        the batch (:func:`broadcast_over_batch`), keyed by (call id, output index). Such an output (a position
        embedding's) is shared by every sample, so its gradient must be summed over ranks, not its norm's squares."""
        self.calls: list[tuple[int, int]] = []
        """(module index, call index of that module) per forward call, in forward order."""
        self.norms: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        """Per call: (L2 norm, max |g|) of each output's gradient, as 0-dim device tensors."""
        self.samples: list[list[torch.Tensor]] = []
        """Per call: a strided sample (a small copy) of each output's gradient, for the precision histograms."""
        self.time_norms: dict[int, torch.Tensor] = {}
        """Per call of a fused recurrent module: ‖∂L/∂x_t‖ for every time step t (1-D device tensor)."""
        self.output_max: list[torch.Tensor] = []
        """With ``outputs``: max |element| of each call's floating-point outputs (NaN/Inf in the forward)."""
        self.nodes: list[tuple[Any, ...]] = []
        """With ``graph``: per call, the ``grad_fn`` of each output that needs a gradient, as made by the call
        (probe/graph.py walks the graph to them; :meth:`forget_nodes` lets the graph go)."""
        self.backward_order: list[int] = []
        """Call ids in the order their output gradients arrived (the backward order)."""
        self._calls_per_module = [0] * len(modules)

    def _register(self) -> None:
        for index, module in enumerate(self._modules):
            if isinstance(module, nn.RNNBase):
                self._stack.enter_context(module.register_forward_pre_hook(self._time_hook(module)))
            self._stack.enter_context(module.register_forward_hook(self._forward_hook(index)))

    def _forward_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return  # an evaluation pass under no_grad: nothing flows back through it
            call_id = len(self.calls)
            self.calls.append((index, self._calls_per_module[index]))
            self._calls_per_module[index] += 1
            self.norms.append([])
            self.samples.append([])
            if self._keep_outputs:
                peaks = [max_abs(t.detach()) for t in float_leaves(output) if t.numel()]
                self.output_max.append(torch.stack(peaks).max() if peaks else torch.zeros(()))
            watched = [t for t in float_leaves(output) if t.requires_grad]
            if self._keep_nodes:  # as made now: an in-place op later gives the tensor another grad_fn
                self.nodes.append(tuple(t.grad_fn for t in watched if t.grad_fn is not None))
            for tensor in watched:
                self._watch(tensor, self._grad_hook(call_id))

        return hook

    def forget_nodes(self) -> None:
        """Drop the saved ``grad_fn`` nodes (they hold the graph, and its saved tensors, alive)."""
        self.nodes = []

    def _grad_hook(self, call_id: int) -> Any:
        def hook(grad: torch.Tensor | None) -> None:
            if grad is not None and grad.numel():  # cuDNN's fused RNN can hand a None gradient to an output
                module = self._modules[self.calls[call_id][0]]
                if self.rows is not None and broadcast_over_batch(grad, self.rows, module):
                    self.shared[(call_id, len(self.norms[call_id]))] = grad.detach().clone()
                self.norms[call_id].append(norm_and_max_abs(grad))
                self.backward_order.append(call_id)
                if self._keep_samples:
                    self.samples[call_id].append(sample(grad).clone())  # a copy: the gradient itself is freed

        return hook

    def _time_hook(self, module: nn.RNNBase) -> Any:
        """Make the sequence input of a fused RNN report ‖∂L/∂x_t‖ per time step.

        An input that needs no gradient is replaced by a detached copy that does: nothing
        upstream is cut, and backward computes one extra product per step.
        """

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not torch.is_grad_enabled():
                return None
            if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
                return None  # a PackedSequence has no plain time axis
            if module.bidirectional:
                return None  # the reverse direction's gradient would mask the forward one's decay
            x = args[0]
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            time_dim = 1 if module.batch_first and x.dim() == 3 else 0
            call_id = len(self.calls)  # the forward hook of this call appends it next
            self._watch(x, self._time_grad_hook(call_id, time_dim))
            return (x, *args[1:])

        return hook

    def _time_grad_hook(self, call_id: int, time_dim: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            other = [d for d in range(grad.dim()) if d != time_dim]
            # float64: in float32 the squares of elements below ~1e-22 flush to 0 and a norm reads 0 while every
            # element is non-zero (the zoo's nn.GRU over 200 steps: 0 in float32, 2.3e-38 in float64)
            norms = torch.linalg.vector_norm(grad, dim=other, dtype=torch.float64) if other else grad.abs().double()
            self.time_norms[call_id] = norms

        return hook

    def _watch(self, tensor: torch.Tensor, hook: Any) -> None:
        handle: RemovableHandle = tensor.register_hook(hook)
        self._stack.callback(handle.remove)
