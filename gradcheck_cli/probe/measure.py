"""One seeded forward and backward pass with hooks; per-layer norms reduced with a single sync."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradcheck_cli.distributed.reduce import (
    ACT_NORM,
    MAX,
    MEAN,
    PARAM_COUNT,
    PARAM_MAX,
    PARAM_NORM,
    agreed,
    is_dtensor,
    local,
)
from gradcheck_cli.distributed.reduce import current as current_sharding
from gradcheck_cli.errors import (
    BatchError,
    ModelCodeError,
    OutOfMemory,
    first_line,
    is_out_of_memory,
    raised_in_gradcheck,
)
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.sizes import iter_tensors
from gradcheck_cli.probe.activations import ActivationRecorder
from gradcheck_cli.probe.loss import choose_loss, float_leaves
from gradcheck_cli.probe.modules import module_type, parametrised_modules, supports_module_hooks
from gradcheck_cli.probe.norms import norm_and_max_abs
from gradcheck_cli.probe.precision import BINS, NON_FINITE_BIN, grouped_histograms
from gradcheck_cli.probe.readout import Readout
from gradcheck_cli.probe.recorder import ActivationGradientRecorder, max_abs
from gradcheck_cli.probe.results import LayerMeasure, LossChoice, Norm, ProbeResult


def set_mode(model: nn.Module, train: bool) -> str:
    """Switch train/eval and return the mode used; ``torch.export`` programs cannot switch (they stay as exported)."""
    try:
        model.train(train)
    except NotImplementedError:
        return "as exported (train/eval cannot be switched)"
    return "train" if train else "eval"


def probe(
    model: nn.Module,
    batch: Batch,
    *,
    seed: int = 0,
    train: bool = True,
    unfreeze: bool = False,
    keep_grads: bool = False,
    autocast: str | None = None,
    loss_scale: float = 1.0,
) -> ProbeResult:
    """Run one forward and backward pass of ``model`` on ``batch`` and measure every layer.

    Frozen parameters get gradients for this pass only, so the flow through them is measured;
    a model with no trainable parameter at all is refused unless ``unfreeze``. The model's
    modes, ``requires_grad`` flags and existing ``.grad`` values are restored, and no hook
    outlives the call, whether it succeeds or raises. ``keep_grads`` leaves this pass's
    gradients in ``.grad`` (for an optimiser step on a copy) instead of restoring the old ones.
    ``autocast`` (``fp16``/``bf16``) runs forward and loss under ``torch.autocast``; the loss is
    multiplied by ``loss_scale`` before backward (GradScaler-style) and every gradient number
    divided back, so the report reads in unscaled units while half precision saw scaled values.
    """
    named = parametrised_modules(model)
    if not any(p.is_floating_point() for _, m in named for p in m.parameters(recurse=False)):
        raise BatchError("the model has no floating-point parameters, so there is no gradient to check")
    sharding = current_sharding()
    subclass = next(
        (
            p
            for _, m in named
            for p in m.parameters(recurse=False)
            if type(p.detach()) is not torch.Tensor and not (sharding is not None and is_dtensor(p))
        ),
        None,
    )
    if subclass is not None:
        raise BatchError(
            f"parameters of tensor subclass {type(subclass.detach()).__name__} are not supported yet; "
            "check the model with plain tensor weights"
        )
    modules = [m for _, m in named]
    hooks = supports_module_hooks(model)
    params = _unique_params(modules)
    frozen = {id(p) for p in params if not p.requires_grad}
    if not unfreeze and all(id(p) in frozen for p in params if p.is_floating_point()):
        raise BatchError(
            "the model has no trainable parameters (every one has requires_grad=False); unfreeze the layers you "
            "train, or pass --unfreeze to measure the gradient flow anyway"
        )
    with (
        _restored_state(model, params, keep_grads),
        torch.random.fork_rng(devices=_cuda_devices(params)),
        torch.enable_grad(),
        ActivationGradientRecorder(
            modules if hooks else [], batch_rows=_batch_rows(batch) if sharding is not None else None
        ) as recorder,
        ActivationRecorder(model if hooks else nn.Module()) as activations,
    ):
        torch.manual_seed(seed)
        mode = set_mode(model, train)
        for p in params:
            p.grad = None
            if p.is_floating_point():
                p.requires_grad_(True)
        with _autocast(autocast, params):
            if sharding is None:
                output = _forward(model, batch, seed)
                loss, choice = choose_loss(output, batch.target, seed)
            else:  # a rank whose forward fails must not leave the others waiting in backward's all-reduce
                output, (loss, choice) = agreed("the forward pass", lambda: _forward_and_loss(model, batch, seed))
        # aminmax, not an inf-norm: that would materialise |output| (51 MB for GPT-2's logits) at the peak
        output_max = [max_abs(t.detach()) for t in float_leaves(output) if t.numel()]
        del output
        _backward(loss * loss_scale if loss_scale != 1.0 else loss)
        result = _collect(named, params, frozen, recorder, activations, choice, loss.detach(), output_max, hooks, mode)
        if autocast is None and loss_scale == 1.0:
            return result
        return _unscaled(result, autocast, loss_scale)


def _batch_rows(batch: Batch) -> int | None:
    """Samples in the batch: the leading size of its first tensor input."""
    for value in (*batch.args, *batch.kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _forward_and_loss(model: nn.Module, batch: Batch, seed: int) -> tuple[Any, tuple[torch.Tensor, LossChoice]]:
    output = _forward(model, batch, seed)
    return output, choose_loss(output, batch.target, seed)


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BACKOFF = 2.0**-4
"""When a loss scale overflows, try this much smaller (GradScaler halves per step; one probe does 4 at once)."""


def probe_scaled(
    model: nn.Module,
    batch: Batch,
    *,
    seed: int,
    train: bool,
    unfreeze: bool,
    autocast: str | None,
    loss_scale: float,
) -> ProbeResult:
    """:func:`probe` with the loss scaled GradScaler-style: a scale whose gradients overflow backs off.

    GradScaler skips a step whose gradients hold Inf/NaN and lowers its scale; this tries
    ``loss_scale``, then 16× smaller, until the gradients are finite or the scale reaches 1
    (where non-finite gradients are the model's own). The result carries the scale that worked.
    """
    scale = loss_scale
    while True:
        result = probe(model, batch, seed=seed, train=train, unfreeze=unfreeze, autocast=autocast, loss_scale=scale)
        if scale <= 1.0 or _gradients_finite(result):
            return result
        scale = max(1.0, scale * BACKOFF)


def _gradients_finite(result: ProbeResult) -> bool:
    norms = [n for m in result.layers for n in (m.grad, *m.calls) if n is not None]
    return all(n.finite for n in norms)


def _autocast(kind: str | None, params: list[nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    if kind is None:
        return contextlib.nullcontext()
    device = next((p.device.type for p in params), "cpu")
    return torch.autocast(device_type=device, dtype=AUTOCAST_DTYPES[kind])


def _unscaled(result: ProbeResult, autocast: str | None, scale: float) -> ProbeResult:
    """Divide every gradient number by the loss scale (norms, maxima, through-time profiles, histograms)."""

    def norm(n: Norm | None) -> Norm | None:
        return None if n is None else Norm(n.l2 / scale, n.max_abs / scale)

    shift = round(math.log2(scale))
    layers = tuple(
        dataclasses.replace(
            m,
            grad=norm(m.grad),
            calls=tuple(norm(c) for c in m.calls),
            time_profile=tuple(v / scale for v in m.time_profile),
        )
        for m in result.layers
    )
    precision = tuple(_shift_histogram(h, shift) for h in result.precision)
    return dataclasses.replace(result, layers=layers, precision=precision, autocast=autocast, loss_scale=scale)


def _shift_histogram(hist: tuple[float, ...], shift: int) -> tuple[float, ...]:
    """The histogram of g / 2^shift: every finite non-zero exponent moves down by ``shift``."""
    if shift == 0 or not hist:
        return hist
    head = list(hist[: NON_FINITE_BIN + 1])
    body = [0.0] * (BINS - NON_FINITE_BIN - 1)
    for index in range(NON_FINITE_BIN + 1, BINS):
        target = min(max(index - shift, NON_FINITE_BIN + 1), BINS - 1)
        body[target - NON_FINITE_BIN - 1] += hist[index]
    return (*head, *body)


OUT_OF_MEMORY_HINT = "ran out of memory; try a smaller batch (fewer samples or shorter sequences) or another --device"


def _forward(model: nn.Module, batch: Batch, seed: int) -> Any:
    """``model(*args, **kwargs)``; a forward that raises becomes one line naming the module where it did."""
    tensors = [v for v in (*batch.args, *batch.kwargs.values()) if isinstance(v, torch.Tensor)]
    if tensors and any(t.numel() == 0 for t in tensors):
        raise BatchError(f"the batch is empty ({batch.describe()}); save at least one sample")
    try:
        return model(*batch.args, **batch.kwargs)
    except (Exception, SystemExit) as exc:  # the user's forward can raise anything; it is their input that failed
        if is_out_of_memory(exc):
            raise OutOfMemory(f"the forward pass {OUT_OF_MEMORY_HINT} ({first_line(exc)})") from None
        if isinstance(exc, SystemExit):
            raise ModelCodeError(f"the model's forward called sys.exit({exc.code!r}); a model that exits cannot be "
                                 "judged: remove the call") from None  # fmt: skip
        from gradcheck_cli.load.synthetic import expected_input
        from gradcheck_cli.probe.tracker import where_forward_raises

        where = where_forward_raises(model, batch, seed)
        expected = expected_input(model)
        place = f" in {where}" if where else ""
        hint = f"; {expected}, the batch is {batch.describe()}" if expected else f"; the batch is {batch.describe()}"
        raise BatchError(f"the forward pass raised{place}: {type(exc).__name__}: {first_line(exc)}{hint}") from None


def _backward(loss: torch.Tensor) -> None:
    try:
        loss.backward()
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemory(f"the backward pass {OUT_OF_MEMORY_HINT} ({first_line(exc)})") from None
        if raised_in_gradcheck(exc):
            raise  # a bug of ours: exit 3 with its traceback
        raise ModelCodeError(
            f"the backward pass raised {type(exc).__name__}: {first_line(exc)} (in the model's own backward code: "
            "a custom autograd Function or a tensor hook); fix it, or check the model without it"
        ) from None


def _unique_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _cuda_devices(params: list[nn.Parameter]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


@contextlib.contextmanager
def untouched_tensors(model: nn.Module, batch: Any) -> Iterator[None]:
    """The batch's tensors and the model's plain tensor attributes (not parameters, not buffers) as they were:
    backward would leave a ``.grad`` on a leaf that requires grad, and a hook's removal an empty hook dict
    where there was none."""
    attributes = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    given = (batch.args, batch.kwargs, batch.target) if isinstance(batch, Batch) else batch
    inputs = [t for _, t in iter_tensors(given)]
    tensors = {id(t): t for t in (*inputs, *attributes) if not isinstance(t, nn.Parameter)}
    saved = [(t, t.grad if t.is_leaf else None, t._backward_hooks) for t in tensors.values() if t.requires_grad]
    try:
        yield
    finally:
        for tensor, grad, hooks in saved:
            if tensor.is_leaf:
                tensor.grad = grad
            if hooks is None and tensor._backward_hooks is not None and not tensor._backward_hooks:
                tensor._backward_hooks = None


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Every non-boolean buffer as it was: a pass, or only reading a parametrised weight in train mode
    (spectral norm's power iteration), updates running statistics and such in place."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers() if buffer.dtype != torch.bool]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def _restored_state(model: nn.Module, params: list[nn.Parameter], keep_grads: bool = False) -> Iterator[None]:
    """Give back every module's ``training`` flag, every parameter's flags and gradient (unless
    ``keep_grads``), and every buffer a pass can update (BatchNorm running statistics, spectral norm's
    power-iteration vectors...; boolean masks are left out: nothing updates them)."""
    training = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in params]
    running = [(buffer, buffer.detach().clone()) for buffer in model.buffers() if buffer.dtype != torch.bool]
    try:
        yield
    finally:
        for module, mode in training:
            module.training = mode
        for p, requires_grad, grad in flags:
            if not keep_grads:
                p.grad = grad
            if p.is_floating_point():
                p.requires_grad_(requires_grad)
        with torch.no_grad():
            for buffer, saved in running:
                buffer.copy_(saved)


def _collect(
    named: list[tuple[str, nn.Module]],
    params: list[nn.Parameter],
    frozen: set[int],
    recorder: ActivationGradientRecorder,
    activations: ActivationRecorder,
    choice: LossChoice,
    loss: torch.Tensor,
    output_max: list[torch.Tensor],
    hooks: bool,
    mode: str,
) -> ProbeResult:
    """Reduce every norm on the device, then copy them to the host in one synchronisation."""
    float_params = [p for p in params if p.is_floating_point()]
    with_grad = [p for p in float_params if p.grad is not None]
    grads = [local(p.grad) for p in with_grad if p.grad is not None]
    readout = Readout()
    add = readout.add
    add(list(torch._foreach_norm([local(p.detach()) for p in float_params])) if float_params else [], PARAM_NORM)
    grad_pairs = [norm_and_max_abs(g) for g in grads]
    add([l2 for l2, _ in grad_pairs], PARAM_NORM)
    add([peak for _, peak in grad_pairs], PARAM_MAX)
    sharding = current_sharding()
    act_pairs = readout.add_activation_gradients(recorder, sharding)
    add(output_max, MAX)
    add([loss.reshape(())], MEAN)
    timed = sorted(recorder.time_norms)
    add([recorder.time_norms[call_id] for call_id in timed], ACT_NORM)
    hist = _layer_histograms(named, with_grad, recorder)
    add([hist], PARAM_COUNT)
    activation_values = activations.device_tensors()
    add(activation_values, MEAN)
    take = readout.read(sharding).take

    weight_norm = dict(zip(map(id, float_params), take(len(float_params)), strict=True))
    grad_l2 = dict(zip(map(id, with_grad), take(len(with_grad)), strict=True))
    grad_max = dict(zip(map(id, with_grad), take(len(with_grad)), strict=True))
    act_values = take(2 * act_pairs)
    out_values = take(len(output_max))
    loss_value = take(1)[0]
    time_of = {call_id: tuple(take(recorder.time_norms[call_id].numel())) for call_id in timed}
    hist_values = take(hist.numel())
    precision = tuple(tuple(hist_values[i * BINS : (i + 1) * BINS]) for i in range(len(named)))
    activation_totals = activations.summarise(take(len(activation_values)))

    per_call: list[Norm | None] = []
    offset = 0
    for call in recorder.norms:
        pairs = [(act_values[offset + 2 * k], act_values[offset + 2 * k + 1]) for k in range(len(call))]
        offset += 2 * len(call)
        per_call.append(_combine(pairs))

    calls_of: list[list[Norm | None]] = [[] for _ in named]
    profile_of: dict[int, tuple[float, ...]] = {}
    for call_id, ((layer, _), norm) in enumerate(zip(recorder.calls, per_call, strict=True)):
        calls_of[layer].append(norm)
        if call_id in time_of:
            profile_of.setdefault(layer, time_of[call_id])

    layers = []
    for index, (name, module) in enumerate(named):
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        grads_here = [(grad_l2[id(p)], grad_max[id(p)]) for p in own if id(p) in grad_l2]
        layers.append(
            LayerMeasure(
                name=name,
                type=module_type(module),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                frozen=bool(own) and all(id(p) in frozen for p in own),
                weight_norm=math.sqrt(sum(weight_norm[id(p)] ** 2 for p in own)),
                grad=_combine(grads_here),
                calls=tuple(calls_of[index]),
                time_profile=profile_of.get(index, ()),
            )
        )
    return ProbeResult(
        layers=tuple(layers),
        call_order=tuple(recorder.calls),
        activation_hooks=hooks,
        loss=choice,
        loss_value=loss_value,
        mode=mode,
        output_finite=all(math.isfinite(v) for v in out_values),
        precision=precision,
        activations=activation_totals,
        leaf_calls=tuple(activations.leaf_calls),
    )


def _layer_histograms(
    named: list[tuple[str, nn.Module]], with_grad: list[nn.Parameter], recorder: ActivationGradientRecorder
) -> torch.Tensor:
    """Exponent histograms per layer (layers × BINS) of its parameter gradients and activation-gradient samples."""
    owner: dict[int, int] = {}
    for index, (_, module) in enumerate(named):
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), index)
    tensors = [local(p.grad) for p in with_grad if p.grad is not None and not p.grad.is_sparse]
    groups = [owner[id(p)] for p in with_grad if p.grad is not None and not p.grad.is_sparse]
    for (layer, _), samples in zip(recorder.calls, recorder.samples, strict=True):
        tensors += samples
        groups += [layer] * len(samples)
    device = tensors[0].device if tensors else torch.device("cpu")
    by_device: dict[torch.device, tuple[list[torch.Tensor], list[int]]] = {}
    for t, group in zip(tensors, groups, strict=True):
        members, owners = by_device.setdefault(t.device, ([], []))
        members.append(t)
        owners.append(group)
    total = torch.zeros((len(named), BINS), dtype=torch.int64, device=device)
    for members, owners in by_device.values():
        total += grouped_histograms(members, owners, len(named)).to(device)
    return total


def _combine(pairs: list[tuple[float, float]]) -> Norm | None:
    """One norm over several tensors: √Σ‖·‖², and the largest |element|."""
    if not pairs:
        return None
    maxima = [m for _, m in pairs]
    nan = any(math.isnan(m) for m in maxima)
    return Norm(l2=math.sqrt(sum(l2 * l2 for l2, _ in pairs)), max_abs=math.nan if nan else max(maxima))
