"""The hooks of one recorded training step: armed before its forward, read and removed at ``w.step()``.

Parameter gradients are taken by post-accumulate-grad hooks, as backward produces them: after every
micro-batch of a gradient-accumulation step (the last one holds the sum), before any clipping the loop
applies, and still multiplied by the loss scale of a ``GradScaler`` (divided out when read). Activation
gradients come from the same recorder ``inspect`` uses, without its precision samples, plus the max
|element| of every output (NaN/Inf in the forward pass) and the order gradients arrived in (backward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradcheck_cli.distributed.reduce import (
    FIRST,
    MAX,
    MEAN,
    NONE,
    PARAM_MAX,
    PARAM_NORM,
    Sharding,
    collective_device,
    local,
)
from gradcheck_cli.probe.loss import float_leaves
from gradcheck_cli.probe.modules import module_type
from gradcheck_cli.probe.norms import norm_and_max_abs
from gradcheck_cli.probe.readout import Readout
from gradcheck_cli.probe.recorder import ActivationGradientRecorder, HookStack, max_abs
from gradcheck_cli.training.log import LayerLog, StepLog


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
        self._params = _unique_params([m for _, m in self._named])
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
            self.param_norms[index] = norm_and_max_abs(p.grad.detach())  # the last micro-batch's holds the sum

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
        """Every number of this step, copied to the host in one synchronisation.

        ``param_scaled``: whether the parameter gradients still carry ``scale`` (not after ``scaler.unscale_``
        under DDP/FSDP, where they are read now); activation gradients always do (taken during backward).
        """
        recorder = self.activations
        if self._sharding is not None:  # every rank must send the same values: a loss and a NaN marker always
            if loss is not None and not isinstance(loss, torch.Tensor):
                loss = torch.tensor(float(loss), device=collective_device())
            if loss_sentinel is None:
                loss_sentinel = torch.full((), -1, dtype=torch.int64, device=collective_device())
        if self._sharding is not None and not self.backward_passes:
            self._read_reduced_gradients()  # no backward seen through the root (e.g. no module hooks): read now
        elif self._sharding is not None:
            param_scaled = True  # taken at the end of backward, before any scaler.unscale_
        floats = [p for p in self._params if p.is_floating_point()]
        readout = Readout()
        add = readout.add
        add(list(torch._foreach_norm([local(p.detach()) for p in floats])) if floats else [], PARAM_NORM)
        grad_ids = sorted(self.param_norms)
        for i in grad_ids:
            add([self.param_norms[i][0]], PARAM_NORM)
            add([self.param_norms[i][1]], PARAM_MAX)
        act_pairs = readout.add_activation_gradients(recorder, self._sharding)
        add(recorder.output_max, MAX)
        add(self.root_output_max, MAX)
        extra = {"loss": loss, "scale": scale, "sentinel": loss_sentinel}
        tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
        reductions = {"loss": MEAN, "scale": NONE, "sentinel": FIRST}
        for name, value in tensors.items():
            add([value.detach().float().mean().reshape(1)], reductions[name])
        take = readout.read(self._sharding).take

        weight_of = dict(zip(map(id, floats), take(len(floats)), strict=True))
        grad_values = take(2 * len(grad_ids))
        grad_of = {i: (grad_values[2 * k], grad_values[2 * k + 1]) for k, i in enumerate(grad_ids)}
        act_values = take(2 * act_pairs)
        call_out = take(len(recorder.output_max))
        root_out = take(len(self.root_output_max))
        read = dict(zip(tensors, take(len(tensors)), strict=True))
        plain = {k: (float(v) if v is not None else None) for k, v in extra.items() if not isinstance(v, torch.Tensor)}
        number = {**plain, **read}

        scale_value = number.get("scale")
        divide = scale_value if scale_value and scale_value > 0 else 1.0
        param_divide = divide if param_scaled else 1.0
        per_call: list[tuple[float, float] | None] = []
        offset = 0
        for call in recorder.norms:
            pairs = [(act_values[offset + 2 * k], act_values[offset + 2 * k + 1]) for k in range(len(call))]
            offset += 2 * len(call)
            per_call.append(_combine(pairs, divide))
        order, folded, folded_out, micro = _fold(
            recorder.calls, per_call, call_out, self.backward_passes, len(self._named)
        )

        index_of = {id(p): i for i, p in enumerate(self._params)}
        layers = []
        for layer_index, (name, module) in enumerate(self._named):
            own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
            pairs = [grad_of[index_of[id(p)]] for p in own if index_of[id(p)] in grad_of]
            outs = folded_out[layer_index]
            layers.append(
                LayerLog(
                    name=name,
                    type=module_type(module),
                    params=sum(p.numel() for p in module.parameters(recurse=False)),
                    frozen=bool(own) and not any(p.requires_grad for p in own),
                    weight_norm=math.sqrt(sum(weight_of[id(p)] ** 2 for p in own)),
                    grad=_combine(pairs, param_divide),
                    calls=tuple(folded[layer_index]),
                    output_max=_peak(outs) if outs else None,
                )
            )
        log = StepLog(
            step=step,
            layers=tuple(layers),
            order=tuple(order),
            activation_hooks=self.activation_hooks,
            micro_batches=micro,
            loss=number.get("loss"),
            scale=scale_value,
            output_max=_peak(root_out) if root_out else None,
            loss_non_finite_step=_sentinel_step(number.get("sentinel")),
            unique_total=math.sqrt(sum(l2 * l2 for l2, _ in grad_of.values())) / param_divide,
        )
        return _with_origin(log, self._first_bad_backward(recorder, per_call), self._first_bad_parameter(grad_of))

    def _read_reduced_gradients(self) -> None:
        """Under DDP/FSDP when no backward was seen starting: each parameter's gradient as the framework left it
        (FSDP2: this rank's shard), read at ``step()``; micro-batches are the root module's calls."""
        for index, p in enumerate(self._params):
            if p.grad is not None and p.is_floating_point():
                self.param_order.append(index)
                self.param_norms[index] = norm_and_max_abs(local(p.grad.detach()))
        self.backward_passes = self.root_calls

    def _first_bad_backward(
        self, recorder: ActivationGradientRecorder, per_call: list[tuple[float, float] | None]
    ) -> str | None:
        for call_id in recorder.backward_order:
            pair = per_call[call_id]
            if pair is not None and not math.isfinite(pair[1]):
                return self._named[recorder.calls[call_id][0]][0]
        return None

    def _first_bad_parameter(self, grad_of: dict[int, tuple[float, float]]) -> str | None:
        owner: dict[int, str] = {}
        for name, module in self._named:
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), name)
        for index in self.param_order:
            if index in grad_of and not math.isfinite(grad_of[index][1]):
                return owner.get(id(self._params[index]))
        return None


def _with_origin(log: StepLog, backward: str | None, parameter: str | None) -> StepLog:
    """Name where NaN/Inf showed first: the first module in forward order whose output was non-finite,
    else the first whose output gradient was (backward order), else the first parameter gradient."""
    first_forward = None
    seen: set[int] = set()
    for layer_index in log.order:
        if layer_index in seen:
            continue
        seen.add(layer_index)
        peak = log.layers[layer_index].output_max
        if peak is not None and not math.isfinite(peak):
            first_forward = log.layers[layer_index].name
            break
    for stage, name in (("forward", first_forward), ("backward", backward), ("parameter", parameter)):
        if name is not None:
            return StepLog(**{**log.__dict__, "first_non_finite": name, "first_non_finite_stage": stage})
    return log


def _sentinel_step(value: float | None) -> int | None:
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def _peak(values: Sequence[float]) -> float:
    """The largest value, NaN if any is NaN (``max`` would drop it depending on position)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def _combine(pairs: Sequence[tuple[float, float]], divide: float) -> tuple[float, float] | None:
    """√Σ‖·‖² and the largest |element| over several tensors, divided by the loss scale."""
    if not pairs:
        return None
    l2 = math.sqrt(sum(a * a for a, _ in pairs)) / divide
    return l2, _peak([b for _, b in pairs]) / divide


def _fold(
    calls: list[tuple[int, int]],
    per_call: list[tuple[float, float] | None],
    outs: list[float],
    backward_passes: int,
    n_layers: int,
) -> tuple[list[int], list[list[tuple[float, float] | None]], list[list[float]], int]:
    """Fold the micro-batches of a gradient-accumulation step into one: call k of every micro-batch
    combines (√Σ of squares: the norm over the whole batch), when every micro-batch made the same calls.

    The number of micro-batches is the number of backward passes that accumulated into the step.
    """
    layers_seq = [layer for layer, _ in calls]
    micro = _micro_batches(layers_seq, backward_passes)
    size = len(layers_seq) // micro if micro else 0
    order = layers_seq[:size] if micro > 1 else layers_seq
    folded: list[list[tuple[float, float] | None]] = [[] for _ in range(n_layers)]
    folded_out: list[list[float]] = [[] for _ in range(n_layers)]
    for position, layer in enumerate(order):
        group = [position + k * size for k in range(micro)] if micro > 1 else [position]
        pairs = [per_call[i] for i in group if per_call[i] is not None]
        folded[layer].append(_combine([p for p in pairs if p is not None], 1.0))
        if outs:
            folded_out[layer].append(_peak([outs[i] for i in group]))
    return order, folded, folded_out, max(micro, 1)


def _micro_batches(sequence: list[int], backward_passes: int) -> int:
    """How many micro-batches to fold: the number of backward passes, when the calls repeat that often."""
    n = len(sequence)
    k = backward_passes
    if k <= 1 or n == 0 or n % k:
        return 1
    size = n // k
    return k if all(sequence[i] == sequence[i % size] for i in range(n)) else 1


def _unique_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
