"""The hooks of one recorded training step: armed before its forward, read and removed at ``w.step()``.

Parameter gradients are taken by post-accumulate-grad hooks, as backward produces them: after every
micro-batch of a gradient-accumulation step (the last one holds the sum), before any clipping the loop
applies, and still multiplied by the loss scale of a ``GradScaler`` (divided out when read). Activation
gradients come from the same recorder ``inspect`` uses, without its precision samples, plus the max
|element| of every output (NaN/Inf in the forward pass) and the order gradients arrived in (backward).
Everything is read by the readout ``inspect`` uses (probe/readout.py) into the same types.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradcheck_cli.distributed.reduce import FIRST, MAX, MEAN, Sharding, collective_device, local
from gradcheck_cli.probe.loss import float_leaves
from gradcheck_cli.probe.modules import unique_params
from gradcheck_cli.probe.norms import max_abs, norm_and_max_abs
from gradcheck_cli.probe.readout import Extra, LossScale, Reading, peak, read_layers
from gradcheck_cli.probe.recorder import ActivationGradientRecorder, HookStack
from gradcheck_cli.training.log import StepLog, step_measure


class StepRecorder(HookStack):
    """Every hook one recorded step needs; all of them are removed when the block exits."""

    def __init__(
        self,
        root: nn.Module,
        named: Sequence[tuple[str, nn.Module]],
        activation_hooks: bool,
        sharding: Sharding | None = None,
    ) -> None:
        super().__init__()
        self._root = root
        self._sharding = sharding
        self._named = list(named)
        self._params = unique_params([m for _, m in self._named])
        self.activation_hooks = activation_hooks
        self.activations = ActivationGradientRecorder(
            [m for _, m in self._named] if activation_hooks else [], samples=False, outputs=True
        )
        self.param_norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Per parameter index: (L2, max |g|) of its accumulated gradient, as device tensors."""
        self.param_order: list[int] = []
        """Parameter indices in the order their gradients were first accumulated (the backward order)."""
        self.backward_passes = 0
        """How many backward passes accumulated into the step (micro-batches): the most any parameter saw."""
        self._fired: dict[int, int] = {}
        self.root_output_max: list[torch.Tensor] = []
        self.root_calls = 0

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    def _register(self) -> None:
        if self._sharding is None:  # DDP/FSDP write the reduced gradient at the end of backward: read it at step()
            for index, p in enumerate(self._params):
                if p.requires_grad and p.is_floating_point():
                    self._stack.enter_context(p.register_post_accumulate_grad_hook(self._param_hook(index)))
        if self.activation_hooks:
            self._stack.enter_context(self.activations)
            self._stack.enter_context(self._root.register_forward_hook(self._root_hook, with_kwargs=True))

    def _param_hook(self, index: int) -> Any:
        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if index not in self.param_norms:
                self.param_order.append(index)
            self._fired[index] = self._fired.get(index, 0) + 1
            self.backward_passes = max(self.backward_passes, self._fired[index])
            # the last micro-batch's holds the sum; the max now, not at read(): clipping or zero_grad may come first
            self.param_norms[index] = norm_and_max_abs(p.grad.detach())

        return hook

    def _root_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self.root_calls += 1
        if self._sharding is not None and self.activations.rows is None:
            self.activations.rows = next(
                (int(t.shape[0]) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None
            )
        peaks = [max_abs(t.detach()) for t in float_leaves(output) if t.numel()]
        if peaks:
            self.root_output_max.append(torch.stack(peaks).max())
        if self._sharding is not None:  # learn when this forward's backward starts
            leaf = next((t for t in float_leaves(output) if t.requires_grad), None)
            if leaf is not None:
                handle = leaf.register_hook(self._backward_started)
                self._stack.callback(handle.remove)

    def _backward_started(self, grad: torch.Tensor) -> None:
        """Queue a read of the reduced gradients for the very end of this backward pass.

        DDP and FSDP2 finish their reduction in callbacks they queue during backward; a callback queued now
        would run before theirs, so it queues the read again, which then runs after them all: the gradients
        are reduced (DDP's average, FSDP2's shard) and not yet clipped by anything the loop does afterwards.
        """
        engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(lambda: engine.queue_callback(self._take_reduced_gradients))

    def _take_reduced_gradients(self) -> None:
        for index, p in enumerate(self._params):
            if p.grad is not None and p.is_floating_point():
                if index not in self.param_norms:
                    self.param_order.append(index)
                self.param_norms[index] = norm_and_max_abs(local(p.grad.detach()))  # the last backward's: the sum
        self.backward_passes += 1

    def read(
        self,
        step: int,
        loss: torch.Tensor | float | None,
        scale: torch.Tensor | float | None,
        loss_sentinel: torch.Tensor | None,
        *,
        param_scaled: bool = True,
    ) -> StepLog:
        """Every number of this step, through the readout ``inspect`` uses, in one synchronisation.

        ``param_scaled``: whether the parameter gradients still carry ``scale`` (not after ``scaler.unscale_``
        under DDP/FSDP, where they are read now); activation gradients always do (taken during backward).
        """
        if self._sharding is not None:  # every rank must send the same values: a loss and a NaN marker always
            if loss is not None and not isinstance(loss, torch.Tensor):
                loss = torch.tensor(float(loss), device=collective_device())
            if loss_sentinel is None:
                loss_sentinel = torch.full((), -1, dtype=torch.int64, device=collective_device())
        if self._sharding is not None and not self.backward_passes:
            self._read_reduced_gradients()  # no backward seen through the root (e.g. no module hooks): read now
        elif self._sharding is not None:
            param_scaled = True  # taken at the end of backward, before any scaler.unscale_
        given = {"loss": loss, "sentinel": loss_sentinel}
        tensors = {k: v for k, v in given.items() if isinstance(v, torch.Tensor)}
        extras = [Extra(self.root_output_max, MAX)]
        extras += [
            Extra([v.detach().float().mean().reshape(1)], MEAN if k == "loss" else FIRST) for k, v in tensors.items()
        ]
        reading = read_layers(
            self._named,
            self._params,
            self.param_norms,
            self.activations,
            frozen={id(p) for p in self._params if not p.requires_grad},
            extras=extras,
            sharding=self._sharding,
            scale=LossScale(scale, parameters=param_scaled),
            backward_passes=self.backward_passes,
        )
        root_out, *read = reading.extras
        number = {k: (float(v) if v is not None else None) for k, v in given.items() if k not in tensors}
        number.update({k: values[0] for k, values in zip(tensors, read, strict=True)})
        output_max = peak(root_out) if root_out else None
        layers, call_order, hooks = reading.layers, reading.call_order, self.activation_hooks
        log = StepLog(
            step=step,
            measure=step_measure(layers, call_order, hooks, loss=number["loss"], output_max=output_max),
            micro_batches=reading.micro_batches,
            loss=number["loss"],
            scale=reading.scale,
            output_max=output_max,
            loss_non_finite_step=_sentinel_step(number["sentinel"]),
            unique_total=reading.total_norm,
        )
        return _with_origin(log, self._first_bad_backward(reading), self._first_bad_parameter(reading))

    def _read_reduced_gradients(self) -> None:
        """Under DDP/FSDP when no backward was seen starting: each parameter's gradient as the framework left it
        (FSDP2: this rank's shard), read at ``step()``; micro-batches are the root module's calls."""
        for index, p in enumerate(self._params):
            if p.grad is not None and p.is_floating_point():
                self.param_order.append(index)
                self.param_norms[index] = norm_and_max_abs(local(p.grad.detach()))
        self.backward_passes = self.root_calls

    def _first_bad_backward(self, reading: Reading) -> str | None:
        recorder = self.activations
        for call_id in recorder.backward_order:
            norm = reading.per_call[call_id]
            if norm is not None and not norm.finite:
                return self._named[recorder.calls[call_id][0]][0]
        return None

    def _first_bad_parameter(self, reading: Reading) -> str | None:
        owner: dict[int, str] = {}
        for name, module in self._named:
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), name)
        for index in self.param_order:
            top = reading.grads[index][1] if index in reading.grads else None  # None only from the probe's readout
            if top is not None and not math.isfinite(top):
                return owner.get(id(self._params[index]))
        return None


def _with_origin(log: StepLog, backward: str | None, parameter: str | None) -> StepLog:
    """Name where NaN/Inf showed first: the first module in forward order whose output was non-finite,
    else the first whose output gradient was (backward order), else the first parameter gradient."""
    layers = log.measure.layers
    first_forward = next(
        (layers[i].name for i, k in log.measure.call_order if k == 0 and not _finite(layers[i].output_max)), None
    )
    for stage, name in (("forward", first_forward), ("backward", backward), ("parameter", parameter)):
        if name is not None:
            return dataclasses.replace(log, first_non_finite=name, first_non_finite_stage=stage)
    return log


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def _sentinel_step(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return int(value)
