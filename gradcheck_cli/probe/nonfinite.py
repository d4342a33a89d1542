"""Where NaN/Inf first appeared: one more seeded forward and backward, with hooks on every module.

Run only after a probe has seen a non-finite value, so a healthy model never pays for it. The pass
is the probe's own (same seed, mode, loss, autocast and temporarily unfrozen parameters), so it sees
the same NaN. Unlike ``torch.autograd.detect_anomaly`` it records no stack traces, checks module
boundaries rather than every autograd node, never synchronises per check, and names a module.

Costs, and what is kept:

* Each tensor at a module boundary costs one ``aminmax`` on its device (NaN propagates into both
  ends; the host reads them, so no combining kernel), cached on the tensor and its version counter
  because one module's output is usually the next one's input. Inputs are judged in a forward
  *pre*-hook, before an in-place module such as ``ReLU(inplace=True)`` overwrites them.
* Those 0-dim results reach the host in chunks of :data:`CHUNK` calls: one stack and, on CUDA, one
  non-blocking copy to pinned memory and one event, polled when the next chunk leaves. Once the
  first culprit is known, later calls are not checked at all. The only blocking waits are one after
  the forward, one after the backward, and the final copy below (plus the checks ``choose_loss``
  makes on a class-index target, as in the probe).
* A call's input and output tensors (and a gradient) are referenced only while its chunk is in
  flight. When a call turns out to be the first culprit, they are summarised on the device at once,
  provided their version counters show no in-place op has touched them since; otherwise (an
  in-place culprit, or a ``ReLU(inplace=True)`` that ran before the chunk was read) the forward is
  replayed with the same seed up to that call, with the summaries taken inside its hooks. Nothing
  is cloned, no activation outlives its chunk, and the replay costs at most one forward.
* Every summary and parameter flag reaches the host in one copy at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from gradcheck_cli.errors import BatchError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.loss import choose_loss, float_leaves
from gradcheck_cli.probe.measure import (
    SavedBuffers,
    autocast_context,
    cuda_devices,
    restored_state,
    run_backward,
    run_forward,
    set_mode,
)
from gradcheck_cli.probe.modules import module_type, supports_module_hooks, unique_params
from gradcheck_cli.probe.nonfinite_checks import (
    CallId,
    FirstNonFinite,
    Kept,
    Pending,
    Record,
    RecordCache,
    non_finite_flag,
    summarise,
    untouched,
    with_versions,
)
from gradcheck_cli.probe.readout import to_host
from gradcheck_cli.probe.recorder import HookStack
from gradcheck_cli.report.sections import NonFiniteOrigin, TensorSummary


def locate_non_finite(
    model: nn.Module,
    batch: Batch,
    *,
    seed: int = 0,
    train: bool = True,
    unfreeze: bool = False,
    autocast: str | None = None,
    loss_scale: float = 1.0,
    loss_output: int | str | None = None,
) -> NonFiniteOrigin:
    """Find where NaN/Inf first appears in ``model`` on ``batch``, in forward and in backward order.

    Forward: the first module call to finish whose output holds NaN/Inf while all its floating
    inputs (positional and keyword) were finite, with a summary of each input, of the output (its
    first non-finite floating tensor) and the names of the module's parameters (its children's
    included) that are NaN/Inf. Containers are hooked too, so a NaN made by a functional op inside a
    custom module names that module. A module that runs several times is named with the call:
    ``"cell (call 6 of 10)"`` (1-based). The model itself is not a candidate unless it is a single
    leaf module (named ``""``, as ``named_modules()`` does).

    When no module is to blame, ``forward_module`` is None and either

    * ``forward_inputs`` summarises every floating tensor of the batch (positional, keyword, target)
      when one of them holds NaN/Inf: the batch itself is non-finite; or
    * ``forward_inputs`` is empty and ``forward_output`` None: the value came from a functional op in
      the model's own forward, or from the loss.

    Backward: the first module call, in the order the gradient hooks fire, whose output gradient holds
    NaN/Inf, with a summary of that gradient (divided back by ``loss_scale``).

    An additive attention mask (only 0 and -inf) met as an input, in the batch or made by a
    functional op, does not count as non-finite; a module's output always does.

    Same pass as :func:`gradcheck_cli.probe.measure.probe`: seeded (dropout included), ``train`` or eval
    mode, the same loss, frozen parameters given gradients for the pass (a model with none trainable
    is refused unless ``unfreeze``), and the same ``autocast``/``loss_scale`` when the probe used
    them. Modes, ``requires_grad``, ``.grad``, buffers (batch-norm running statistics) and the global
    RNG are restored, and no hook outlives the call, whether it succeeds or raises. TorchScript
    models take no module hooks: only the batch is checked there.
    """
    named = list(model.named_modules())
    params = unique_params([m for _, m in named])
    floating = [p for p in params if p.is_floating_point()]
    if floating and not unfreeze and not any(p.requires_grad for p in floating):
        raise BatchError(
            "the model has no trainable parameters (every one has requires_grad=False); unfreeze the layers you "
            "train, or pass --unfreeze to measure the gradient flow anyway"
        )
    if not supports_module_hooks(model):
        return _assemble(_Findings(batch=_batch_check(batch)), [])

    hooked = _hooked_modules(model, named)
    with (
        restored_state(model, params) as buffers,
        torch.random.fork_rng(devices=cuda_devices(params)),
        torch.enable_grad(),
    ):
        set_mode(model, train)
        for p in floating:
            p.grad = None
            p.requires_grad_(True)
        with _Locator(hooked) as locator:
            torch.manual_seed(seed)
            with autocast_context(autocast, params):
                output = run_forward(model, batch, seed)
                loss, _ = choose_loss(output, batch.target, seed, loss_output)
            del output
            locator.forward.finish()
            if loss.requires_grad:
                run_backward(loss * loss_scale if loss_scale != 1.0 else loss)
            del loss
            locator.backward.finish()
        findings = _Findings(calls=locator.calls_per_module, loss_scale=loss_scale)
        if locator.forward.found is not None:
            replay = _Replay(model, batch, seed, autocast_context(autocast, params), buffers)
            _forward_culprit(findings, locator, hooked, replay)
        else:
            findings.batch = _batch_check(batch)
        if locator.backward.found is not None:
            findings.backward = (locator.backward.found, locator.backward_summary)
    return _assemble(findings, hooked)


@dataclass(frozen=True)
class _Replay:
    """What a second forward up to the culprit call needs: the pass's model, batch, seed and autocast."""

    model: nn.Module
    batch: Batch
    seed: int
    autocast: contextlib.AbstractContextManager[Any]
    buffers: SavedBuffers
    """Restored first: the replay starts from the state the pass started from."""


def _forward_culprit(
    findings: _Findings, locator: _Locator, hooked: list[tuple[str, nn.Module]], replay: _Replay
) -> None:
    """The first module call whose output went NaN/Inf: its inputs' and outputs' summaries (replayed when an
    in-place op has touched them since) and its non-finite parameters."""
    assert locator.forward.found is not None
    index, call = locator.forward.found
    name, module = hooked[index]
    findings.forward = locator.forward.found
    findings.forward_summaries = locator.forward_summaries
    if findings.forward_summaries is None:  # touched in place since: look again
        replay.buffers.restore()
        with replay.autocast:
            findings.forward_summaries = _replay(replay.model, replay.batch, replay.seed, module, call)
    findings.parameters = [
        (pname, non_finite_flag(p, mask_ok=False))
        for pname, p in module.named_parameters(prefix=name)
        if p.is_floating_point()
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The hooked pass


def _hooked_modules(model: nn.Module, named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Every module but the model itself (unless it is a single leaf), TorchScript parts left out."""
    leaf = next(model.children(), None) is None
    return [(name, m) for name, m in named if (name or leaf) and not isinstance(m, torch.jit.ScriptModule)]


class _Locator(HookStack):
    """Forward pre-/post-hooks for every hooked module and a gradient hook on every floating output.

    The module hooks are two global ones (``register_module_forward_*_hook``) that look the module
    up, rather than two per module: registering a hundred handles costs more than the checks. The
    global pre-hook sees positional inputs only, so keyword inputs are judged in the post-hook (an
    in-place module overwrites its positional input, not a keyword one). Keeps records and call
    counts, and tensors only while their entry is in flight; every hook is removed when the block
    exits, even after an exception.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self._index = {id(m): i for i, (_, m) in enumerate(modules)}
        self._records = RecordCache()
        self._open: list[list[tuple[int, list[Record], Kept]]] = [[] for _ in modules]
        self.calls_per_module = [0] * len(modules)
        self.forward = FirstNonFinite(self._forward_found)
        self.backward = FirstNonFinite(self._backward_found)
        self.forward_summaries: tuple[list[Pending], list[Pending]] | None = None
        """The culprit call's inputs and outputs, when they were still as the call left them."""
        self.backward_summary: Pending | None = None

    def _register(self) -> None:
        self._stack.enter_context(register_module_forward_pre_hook(self._pre_hook))
        self._stack.enter_context(register_module_forward_hook(self._post_hook, with_kwargs=True))

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        index = self._index.get(id(module))
        if index is None:
            return
        call = self.calls_per_module[index]
        self.calls_per_module[index] += 1
        if self.forward.done:
            self._open[index].append((call, [], []))
            return
        # judged before the module runs: an in-place module overwrites its input
        inputs = _float_list(args[0]) if len(args) == 1 else _float_list(args)
        self._open[index].append((call, self._records.all(inputs, mask_ok=True), with_versions(inputs)))

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        index = self._index.get(id(module))
        if index is None:
            return
        opened = self._open[index]
        call, inputs, kept = opened.pop() if opened else (self.calls_per_module[index] - 1, [], [])
        leaves = _float_list(output)
        if not self.forward.done:
            outputs = self._records.all(leaves, mask_ok=False)
            if outputs:
                if kwargs:
                    keyword = _float_list(kwargs)
                    inputs = inputs + self._records.all(keyword, mask_ok=True)
                    kept = kept + with_versions(keyword)
                self.forward.offer((index, call), outputs, inputs, (kept, with_versions(leaves)))
        for tensor in leaves:
            if tensor.requires_grad:
                self._stack.enter_context(tensor.register_hook(self._grad_hook((index, call))))

    def _grad_hook(self, call: CallId) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if not self.backward.done:
                record = self._records.of(grad, mask_ok=False)
                if record is not None:
                    self.backward.offer(call, [record], [], grad)

        return hook

    def _forward_found(self, keep: tuple[Kept, Kept]) -> None:
        inputs, outputs = keep
        if untouched(inputs) and untouched(outputs):
            self.forward_summaries = ([summarise(t) for t, _ in inputs], [summarise(t) for t, _ in outputs])

    def _backward_found(self, grad: torch.Tensor) -> None:
        self.backward_summary = summarise(grad)


def _float_list(value: Any) -> list[torch.Tensor]:
    """``list(float_leaves(value))``, without a generator for the usual single tensor."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    return list(float_leaves(value))


def _floats(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    yield from float_leaves(args)
    yield from float_leaves(kwargs)


class _Stop(Exception):
    """Raised by the replay's hook once the culprit call has been summarised."""


def _replay(
    model: nn.Module, batch: Batch, seed: int, module: nn.Module, call: int
) -> tuple[list[Pending], list[Pending]] | None:
    """The culprit call's inputs (taken before it runs) and outputs, from a seeded forward stopped right after it.

    None when the replay did not reach that call (a forward that is not deterministic).
    """
    inputs: list[Pending] = []
    outputs: list[Pending] = []
    opened: list[int] = []
    count = 0

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal count
        if count == call:
            inputs[:] = [summarise(t) for t in _floats(args, kwargs)]
        opened.append(count)
        count += 1

    def post(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if opened and opened.pop() == call:
            outputs[:] = [summarise(t) for t in float_leaves(output)]
            raise _Stop

    with (
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post),
        contextlib.suppress(Exception),  # _Stop, or whatever a forward that differs the second time raises
    ):
        torch.manual_seed(seed)
        model(*batch.args, **batch.kwargs)
    return (inputs, outputs) if outputs else None


# ---------------------------------------------------------------------------------------------------------------------
# Assembling the result: one copy to the host


@dataclass
class _Findings:
    calls: list[int] | None = None
    forward: CallId | None = None
    forward_summaries: tuple[list[Pending], list[Pending]] | None = None
    parameters: list[tuple[str, torch.Tensor]] | None = None
    batch: tuple[list[Pending], torch.Tensor] | None = None
    """Summaries of the batch's floating tensors, and whether any of them is non-finite."""
    backward: tuple[CallId, Pending | None] | None = None
    loss_scale: float = 1.0


def _batch_check(batch: Batch) -> tuple[list[Pending], torch.Tensor] | None:
    tensors = list(_floats(batch.args, batch.kwargs))
    if batch.target is not None and batch.target.is_floating_point():
        tensors.append(batch.target)
    if not tensors:
        return None
    flags = torch.stack([non_finite_flag(t).to(tensors[0].device) for t in tensors]).any()
    return [summarise(t) for t in tensors], flags


def _assemble(f: _Findings, hooked: list[tuple[str, nn.Module]]) -> NonFiniteOrigin:
    pending: list[Pending] = []
    if f.forward_summaries is not None:
        pending += f.forward_summaries[0] + f.forward_summaries[1]
    if f.batch is not None:
        pending += f.batch[0]
    if f.backward is not None and f.backward[1] is not None:
        pending.append(f.backward[1])
    tensors = [t for p in pending for t in (p.counts, p.values)]
    tensors += [flag for _, flag in f.parameters or []]
    if f.batch is not None:
        tensors.append(f.batch[1])
    values = iter(to_host(tensors) if tensors else [])

    summaries = {id(p): _to_summary(p, [next(values) for _ in range(6)]) for p in pending}
    bad_parameters = tuple(name for name, _ in f.parameters or [] if next(values))
    batch_bad = f.batch is not None and bool(next(values))

    fields: dict[str, Any] = {"forward_module": None}
    if f.forward is not None:
        index, call = f.forward
        fields["forward_module"] = _call_name(hooked, f.calls, index, call)
        fields["forward_type"] = module_type(hooked[index][1])
        fields["non_finite_parameters"] = bad_parameters
        if f.forward_summaries is not None:
            inputs, outputs = ([summaries[id(p)] for p in side] for side in f.forward_summaries)
            fields["forward_inputs"] = tuple(inputs)
            fields["forward_output"] = next((s for s in outputs if s.nan or s.inf), outputs[0])
    elif f.batch is not None and batch_bad:
        fields["forward_inputs"] = tuple(summaries[id(p)] for p in f.batch[0])
    if f.backward is not None:
        (index, call), grad = f.backward
        fields["backward_module"] = _call_name(hooked, f.calls, index, call)
        fields["backward_type"] = module_type(hooked[index][1])
        fields["backward_grad"] = None if grad is None else _unscaled(summaries[id(grad)], f.loss_scale)
    return NonFiniteOrigin(**fields)


def _to_summary(p: Pending, v: list[float]) -> TensorSummary:
    nan, inf, finite, low, high, mean = v
    has = finite > 0
    return TensorSummary(
        shape=p.shape,
        nan=int(nan),
        inf=int(inf),
        finite_min=low if has else None,
        finite_max=high if has else None,
        finite_abs_mean=mean if has else None,
    )


def _unscaled(s: TensorSummary, scale: float) -> TensorSummary:
    if scale == 1.0:
        return s
    return dataclasses.replace(
        s,
        finite_min=None if s.finite_min is None else s.finite_min / scale,
        finite_max=None if s.finite_max is None else s.finite_max / scale,
        finite_abs_mean=None if s.finite_abs_mean is None else s.finite_abs_mean / scale,
    )


def _call_name(hooked: list[tuple[str, nn.Module]], calls: list[int] | None, index: int, call: int) -> str:
    """The module's name, with ``(call k of n)`` (1-based) when it ran more than once."""
    name = hooked[index][0]
    total = calls[index] if calls is not None else 1
    return name if total <= 1 else f"{name} (call {call + 1} of {total})"
