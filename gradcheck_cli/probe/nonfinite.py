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
import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from gradcheck_cli.errors import BatchError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.loss import choose_loss, float_leaves
from gradcheck_cli.probe.measure import (
    _autocast,
    _backward,
    _cuda_devices,
    _forward,
    _restored_state,
    _unique_params,
    set_mode,
)
from gradcheck_cli.probe.modules import module_type, supports_module_hooks
from gradcheck_cli.probe.readout import to_host
from gradcheck_cli.probe.recorder import HookStack
from gradcheck_cli.report.sections import NonFiniteOrigin, TensorSummary

CallId = tuple[int, int]
"""(index of the hooked module, call number of that module, from 0)."""

Kept = list[tuple[torch.Tensor, int | None]]
"""Tensors referenced while a flag is in flight, with their version counters at the time."""


def locate_non_finite(
    model: nn.Module,
    batch: Batch,
    *,
    seed: int = 0,
    train: bool = True,
    unfreeze: bool = False,
    autocast: str | None = None,
    loss_scale: float = 1.0,
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
    params = _unique_params([m for _, m in named])
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
        _restored_state(model, params),
        _restored_buffers([m for _, m in named]) as buffers,
        torch.random.fork_rng(devices=_cuda_devices(params)),
        torch.enable_grad(),
    ):
        set_mode(model, train)
        for p in floating:
            p.grad = None
            p.requires_grad_(True)
        with _Locator(hooked) as locator:
            torch.manual_seed(seed)
            with _autocast(autocast, params):
                output = _forward(model, batch, seed)
                loss, _ = choose_loss(output, batch.target, seed)
            del output
            locator.forward.finish()
            if loss.requires_grad:
                _backward(loss * loss_scale if loss_scale != 1.0 else loss)
            del loss
            locator.backward.finish()

        findings = _Findings(calls=locator.calls_per_module, loss_scale=loss_scale)
        if locator.forward.found is not None:
            index, call = locator.forward.found
            name, module = hooked[index]
            findings.forward = locator.forward.found
            findings.forward_summaries = locator.forward_summaries
            if findings.forward_summaries is None:  # touched in place since: look again
                buffers.restore()  # the replay starts from the state the pass started from
                with _autocast(autocast, params):
                    findings.forward_summaries = _replay(model, batch, seed, module, call)
            findings.parameters = [
                (pname, non_finite_flag(p, mask_ok=False))
                for pname, p in module.named_parameters(prefix=name)
                if p.is_floating_point()
            ]
        else:
            findings.batch = _batch_check(batch)
        if locator.backward.found is not None:
            findings.backward = (locator.backward.found, locator.backward_summary)
    return _assemble(findings, hooked)


# ---------------------------------------------------------------------------------------------------------------------
# Flags and summaries, on the device


def _dense(t: torch.Tensor) -> torch.Tensor | None:
    """The elements to look at: a sparse tensor's stored values; None for layouts we cannot reduce."""
    if t.requires_grad:
        t = t.detach()
    if t.layout == torch.strided and not t.is_nested:
        return t
    return t._values() if t.is_sparse else None


def non_finite_flag(t: torch.Tensor, *, mask_ok: bool = True) -> torch.Tensor:
    """0-dim bool on ``t``'s device: whether ``t`` holds NaN/Inf. No sync.

    One ``aminmax`` (NaN propagates into both ends; far cheaper than ``isfinite().all()`` on CPU).
    With ``mask_ok`` a tensor holding only 0 and -inf, an additive attention mask such as
    ``nn.Transformer.generate_square_subsequent_mask``, does not count (one more pass).
    """
    x = _dense(t)
    if x is None or x.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(x)
    bad = ~((low > -torch.inf) & (high < torch.inf))
    if mask_ok:
        bad = bad & ~((x == 0) | torch.isneginf(x)).all()
    return bad


@dataclass(frozen=True)
class _Pending:
    """A :class:`TensorSummary` whose numbers are still on the device."""

    shape: tuple[int, ...]
    counts: torch.Tensor
    """int64 [NaN count, Inf count, finite count]."""
    values: torch.Tensor
    """float32 [finite min, finite max, finite mean |x|]."""


def _summarise(t: torch.Tensor) -> _Pending:
    """NaN/Inf counts and the range of the finite elements, reduced on the device without a sync."""
    shape = tuple(t.shape)
    x = _dense(t)
    if x is None or x.numel() == 0:
        zero = torch.zeros(3, dtype=torch.int64, device=t.device)
        return _Pending(shape, zero, torch.zeros(3, device=t.device))
    x = x.reshape(-1)
    finite = torch.isfinite(x)
    count = finite.sum()
    counts = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum(), count])
    low = torch.where(finite, x, torch.inf).amin().float()
    high = torch.where(finite, x, -torch.inf).amax().float()
    mean = torch.where(finite, x.abs(), 0).sum(dtype=torch.float32) / count.clamp(min=1)
    return _Pending(shape, counts, torch.stack([low, high, mean]))


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter (nor can they change in place later)
        return None


def _kept(tensors: Iterable[torch.Tensor]) -> Kept:
    return [(t, _version(t)) for t in tensors]


def _untouched(kept: Kept) -> bool:
    """No in-place op has run on any of these tensors since they were kept."""
    return all(_version(t) == version for t, version in kept)


Record = list[torch.Tensor]
"""What the host needs to judge one tensor: [min, max] (NaN propagates into both), and for a tensor
met as an input, a third value: whether it is an additive mask (only 0 and -inf). 0-dim device tensors."""


def _record(t: torch.Tensor, *, mask_ok: bool) -> Record | None:
    """One ``aminmax`` (one kernel; no combining op: the host reads both ends), None for an empty tensor."""
    x = _dense(t)
    if x is None or x.numel() == 0:
        return None
    low, high = torch.aminmax(x)
    if not mask_ok:
        return [low, high]
    return [low, high, ((x == 0) | torch.isneginf(x)).all()]


def _judged_finite(values: list[float]) -> bool:
    """A record read on the host: finite at both ends, or an additive mask."""
    return (math.isfinite(values[0]) and math.isfinite(values[1])) or (len(values) == 3 and values[2] == 1.0)


class _RecordCache:
    """:func:`_record` once per tensor and version: one module's output is the next one's input.

    A tensor is judged as it is first met: as a module's output strictly, as an input (the batch, or
    a tensor made by a functional op) with the attention-mask exception.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, Record | None]] = {}

    def of(self, t: torch.Tensor, *, mask_ok: bool) -> Record | None:
        version = _version(t)
        hit = self._seen.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        record = _record(t, mask_ok=mask_ok)
        if version is not None:
            self._seen[id(t)] = (weakref.ref(t), version, record)
        return record

    def all(self, tensors: Iterable[torch.Tensor], *, mask_ok: bool) -> list[Record]:
        return [r for t in tensors if (r := self.of(t, mask_ok=mask_ok)) is not None]


CHUNK = 16
"""Entries whose values travel to the host together: one stack, one copy (on CUDA non-blocking, one event)."""


class _FirstNonFinite:
    """The first entry, in the order offered, whose outputs hold NaN/Inf while its inputs do not.

    Values are read on the host in order, in chunks of :data:`CHUNK` entries, without stalling the
    device: on CUDA a chunk is copied to pinned memory without blocking and read once its event has
    passed (polled whenever another chunk leaves); on CPU it is read at once. Whatever is offered
    with an entry is held only until the entry is judged; ``on_found`` gets it for the first culprit.
    Once that is known, later offers are ignored.
    """

    def __init__(self, on_found: Callable[[Any], None]) -> None:
        self._on_found = on_found
        self._entries: list[tuple[CallId, list[int], list[int], Any]] = []
        self._values: list[torch.Tensor] = []
        self._pending: deque[tuple[list[tuple[CallId, list[int], list[int], Any]], torch.Tensor, Any]] = deque()
        self.found: CallId | None = None
        self.done = False

    def offer(self, call: CallId, outputs: list[Record], inputs: list[Record], keep: Any = None) -> None:
        if self.done:
            return
        self._entries.append((call, [len(r) for r in outputs], [len(r) for r in inputs], keep))
        for record in outputs:
            self._values += record
        for record in inputs:
            self._values += record
        if len(self._entries) >= CHUNK:
            self._flush()
            self._drain(block=False)

    def finish(self) -> None:
        """Judge every entry still in flight (a blocking wait on CUDA)."""
        self._flush()
        self._drain(block=True)

    def _flush(self) -> None:
        if not self._entries or self.done:
            return
        device = self._values[0].device
        flat = torch.stack([v if v.device == device else v.to(device) for v in self._values])
        event = None
        if flat.is_cuda:
            # the stream named by an indexed device: without one, torch asks the driver for the
            # device count on every call (about 0.3 ms on a virtual machine)
            stream = torch.cuda.current_stream(device)
            flat = flat.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self._pending.append((self._entries, flat, event))
        self._entries, self._values = [], []

    def _drain(self, block: bool) -> None:
        while self._pending and not self.done:
            entries, flat, event = self._pending[0]
            if event is not None and not event.query():
                if not block:
                    return
                event.synchronize()
            self._pending.popleft()
            values = flat.tolist()
            at = 0
            for call, outputs, inputs, keep in entries:
                judged = []
                for size in outputs + inputs:
                    judged.append(_judged_finite(values[at : at + size]))
                    at += size
                if not all(judged[: len(outputs)]) and all(judged[len(outputs) :]):
                    self.found = call
                    self.done = True
                    self._pending.clear()
                    self._entries, self._values = [], []
                    self._on_found(keep)
                    return


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
        self._records = _RecordCache()
        self._open: list[list[tuple[int, list[Record], Kept]]] = [[] for _ in modules]
        self.calls_per_module = [0] * len(modules)
        self.forward = _FirstNonFinite(self._forward_found)
        self.backward = _FirstNonFinite(self._backward_found)
        self.forward_summaries: tuple[list[_Pending], list[_Pending]] | None = None
        """The culprit call's inputs and outputs, when they were still as the call left them."""
        self.backward_summary: _Pending | None = None

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
        self._open[index].append((call, self._records.all(inputs, mask_ok=True), _kept(inputs)))

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
                    kept = kept + _kept(keyword)
                self.forward.offer((index, call), outputs, inputs, (kept, _kept(leaves)))
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
        if _untouched(inputs) and _untouched(outputs):
            self.forward_summaries = ([_summarise(t) for t, _ in inputs], [_summarise(t) for t, _ in outputs])

    def _backward_found(self, grad: torch.Tensor) -> None:
        self.backward_summary = _summarise(grad)


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
) -> tuple[list[_Pending], list[_Pending]] | None:
    """The culprit call's inputs (taken before it runs) and outputs, from a seeded forward stopped right after it.

    None when the replay did not reach that call (a forward that is not deterministic).
    """
    inputs: list[_Pending] = []
    outputs: list[_Pending] = []
    opened: list[int] = []
    count = 0

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal count
        if count == call:
            inputs[:] = [_summarise(t) for t in _floats(args, kwargs)]
        opened.append(count)
        count += 1

    def post(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if opened and opened.pop() == call:
            outputs[:] = [_summarise(t) for t in float_leaves(output)]
            raise _Stop

    with (
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post),
        contextlib.suppress(Exception),  # _Stop, or whatever a forward that differs the second time raises
    ):
        torch.manual_seed(seed)
        model(*batch.args, **batch.kwargs)
    return (inputs, outputs) if outputs else None


class _Buffers:
    def __init__(self, modules: list[nn.Module]) -> None:
        self._saved = [
            (m, name, b, b.detach().clone()) for m in modules for name, b in m._buffers.items() if b is not None
        ]

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, original, copy in self._saved:
                module._buffers[name] = original
                original.copy_(copy)


@contextlib.contextmanager
def _restored_buffers(modules: list[nn.Module]) -> Iterator[_Buffers]:
    """Give back every buffer's value (batch norm updates its running statistics in train mode)."""
    buffers = _Buffers(modules)
    try:
        yield buffers
    finally:
        buffers.restore()


# ---------------------------------------------------------------------------------------------------------------------
# Assembling the result: one copy to the host


@dataclass
class _Findings:
    calls: list[int] | None = None
    forward: CallId | None = None
    forward_summaries: tuple[list[_Pending], list[_Pending]] | None = None
    parameters: list[tuple[str, torch.Tensor]] | None = None
    batch: tuple[list[_Pending], torch.Tensor] | None = None
    """Summaries of the batch's floating tensors, and whether any of them is non-finite."""
    backward: tuple[CallId, _Pending | None] | None = None
    loss_scale: float = 1.0


def _batch_check(batch: Batch) -> tuple[list[_Pending], torch.Tensor] | None:
    tensors = list(_floats(batch.args, batch.kwargs))
    if batch.target is not None and batch.target.is_floating_point():
        tensors.append(batch.target)
    if not tensors:
        return None
    flags = torch.stack([non_finite_flag(t).to(tensors[0].device) for t in tensors]).any()
    return [_summarise(t) for t in tensors], flags


def _assemble(f: _Findings, hooked: list[tuple[str, nn.Module]]) -> NonFiniteOrigin:
    pending: list[_Pending] = []
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


def _to_summary(p: _Pending, v: list[float]) -> TensorSummary:
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
