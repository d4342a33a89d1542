"""One seeded forward and backward pass with hooks; per-layer norms reduced with a single sync."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradcheck_cli.distributed.reduce import ACT_NORM, MAX, MEAN, PARAM_COUNT, agreed, is_dtensor, local
from gradcheck_cli.distributed.reduce import current as current_sharding
from gradcheck_cli.errors import (
    BatchError,
    ModelCodeError,
    OutOfMemory,
    first_line,
    is_out_of_memory,
    raised_in_gradcheck,
)
from gradcheck_cli.load.batch import Batch, batch_misfit
from gradcheck_cli.load.sizes import iter_tensors
from gradcheck_cli.probe.activations import ActivationRecorder
from gradcheck_cli.probe.graph import call_graph
from gradcheck_cli.probe.half_emulation import HalfEmulation
from gradcheck_cli.probe.loss import choose_loss, float_leaves
from gradcheck_cli.probe.module_state import SavedTensorAttributes
from gradcheck_cli.probe.modules import expected_input, parametrised_modules, supports_module_hooks, unique_params
from gradcheck_cli.probe.norms import gradient_norms, l2_norm, max_abs, norms_and_max_abs
from gradcheck_cli.probe.precision import BINS, layer_histograms, shifted_histogram
from gradcheck_cli.probe.program_hooks import recorder_for
from gradcheck_cli.probe.readout import Extra, LossScale, read_layers
from gradcheck_cli.probe.recorder import ActivationGradientRecorder
from gradcheck_cli.probe.results import CallGraph, LossChoice, ProbeResult


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
    loss_output: int | str | None = None,
    precision: bool = False,
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
    ``loss_output`` picks the output the loss is computed from (an index or a key; probe/loss.py).
    Before backward, the autograd graph is walked from the loss (probe/graph.py): every call's depth
    from the loss, and whether it lies on a path to it, come from the graph, not the call order.
    ``precision`` adds what the half-precision forecast reads (diagnose/precision.py): every gradient's exponent
    histogram and each parameter gradient's largest element (without it that is read only where the norm is
    non-finite: a full pass over every gradient that nothing else needs).
    """
    named, params, frozen = _probed_parameters(model, unfreeze)
    modules = [m for _, m in named]
    hooks = supports_module_hooks(model)
    sharding = current_sharding()
    with (
        restored_state(model, params, keep_grads),
        torch.random.fork_rng(devices=cuda_devices(params)),
        torch.enable_grad(),
        recorder_for(
            modules,
            hooks,
            samples=precision,
            batch_rows=_batch_rows(batch) if sharding is not None else None,
            graph=hooks,
        ) as recorder,
        contextlib.ExitStack() as output_hooks,
        ActivationRecorder(model if hooks else nn.Module()) as activations,
    ):
        torch.manual_seed(seed)
        mode = set_mode(model, train)
        for p in params:
            p.grad = None
            if p.is_floating_point():
                p.requires_grad_(True)
        with autocast_context(autocast, params):
            if sharding is None:
                output = run_forward(model, batch, seed)
                loss, choice = _loss(model, batch, output, seed, loss_output)
            else:  # a rank whose forward fails must not leave the others waiting in backward's all-reduce
                output, (loss, choice) = agreed(
                    "the forward pass", lambda: _forward_and_loss(model, batch, seed, loss_output)
                )
        # aminmax, not an inf-norm: that would materialise |output| (51 MB for GPT-2's logits) at the peak
        output_max = [max_abs(t.detach()) for t in float_leaves(output) if t.numel()]
        leaves = [t for t in float_leaves(output) if t.requires_grad]
        graph = call_graph(loss, leaves, recorder.nodes, len(recorder.calls)) if hooks else None
        recorder.forget_nodes()
        output_grads = _watch_outputs(output_hooks, [t for t in leaves if choice.kind != "model" or t.dim()])
        del output, leaves
        run_backward(loss * loss_scale if loss_scale != 1.0 else loss)
        run = _Pass(loss.detach(), choice, output_max, hooks, mode, autocast, loss_scale, graph, output_grads)
        return _collect(named, params, frozen, recorder, activations, run, precision)


def _probed_parameters(
    model: nn.Module, unfreeze: bool
) -> tuple[list[tuple[str, nn.Module]], list[nn.Parameter], set[int]]:
    """The modules that own parameters, each parameter once, and the ids of the frozen ones; a model without a
    floating-point parameter, with a tensor-subclass one, or (unless ``unfreeze``) with nothing trainable is
    refused."""
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
    params = unique_params([m for _, m in named])
    frozen = {id(p) for p in params if not p.requires_grad}
    if not unfreeze and all(id(p) in frozen for p in params if p.is_floating_point()):
        raise BatchError(
            "the model has no trainable parameters (every one has requires_grad=False); unfreeze the layers you "
            "train, or pass --unfreeze to measure the gradient flow anyway"
        )
    return named, params, frozen


def _batch_rows(batch: Batch) -> int | None:
    """Samples in the batch: the leading size of its first tensor input."""
    for value in (*batch.args, *batch.kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def _forward_and_loss(
    model: nn.Module, batch: Batch, seed: int, loss_output: int | str | None
) -> tuple[Any, tuple[torch.Tensor, LossChoice]]:
    output = run_forward(model, batch, seed)
    return output, _loss(model, batch, output, seed, loss_output)


def _loss(
    model: nn.Module, batch: Batch, output: Any, seed: int, loss_output: int | str | None
) -> tuple[torch.Tensor, LossChoice]:
    """:func:`choose_loss`; where the target does not fit because the inputs did not fit the first layer, that."""
    try:
        return choose_loss(output, batch.target, seed, loss_output)
    except BatchError:
        misfit = batch_misfit(model, batch, output)
        if misfit is None:
            raise
        raise BatchError(misfit) from None


def _watch_outputs(stack: contextlib.ExitStack, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """‖∂L/∂output‖ of each output tensor the loss reaches, filled in by backward (0-dim device tensors)."""
    norms: list[torch.Tensor] = []

    def hook(grad: torch.Tensor) -> None:
        norms.append(l2_norm(grad.detach()))  # float32 for a half-precision output, as before

    for leaf in leaves:
        stack.callback(leaf.register_hook(hook).remove)
    return norms


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
    loss_output: int | str | None = None,
    precision: bool = False,
) -> ProbeResult:
    """:func:`probe` with the loss scaled GradScaler-style: a scale whose gradients overflow backs off.

    GradScaler skips a step whose gradients hold Inf/NaN and lowers its scale; this tries
    ``loss_scale``, then 16× smaller, until the gradients are finite or the scale reaches 1
    (where non-finite gradients are the model's own). The result carries the scale that worked.
    """
    scale = loss_scale
    while True:
        result = probe(
            model,
            batch,
            seed=seed,
            train=train,
            unfreeze=unfreeze,
            autocast=autocast,
            loss_scale=scale,
            loss_output=loss_output,
            precision=precision,
        )
        if scale <= 1.0 or _gradients_finite(result):
            return result
        scale = max(1.0, scale * BACKOFF)


def _gradients_finite(result: ProbeResult) -> bool:
    norms = [n for m in result.layers for n in (m.grad, *m.calls) if n is not None]
    return all(n.finite for n in norms)


def autocast_context(kind: str | None, params: list[nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` of ``kind`` on the parameters' device; fp16 on a CPU is CUDA's fp16 autocast emulated
    with float32 kernels (:mod:`~gradcheck_cli.probe.half_emulation`: the CPU's fp16 kernels are 7-11× slower)."""
    if kind is None:
        return contextlib.nullcontext()
    device = autocast_device(params)
    if kind == "fp16" and device == "cpu":
        return HalfEmulation()
    return torch.autocast(device_type=device, dtype=AUTOCAST_DTYPES[kind])


def autocast_device(params: list[nn.Parameter]) -> str:
    """The device type autocast runs on: the parameters' (the first one's), a CPU without parameters."""
    return next((p.device.type for p in params), "cpu")


OUT_OF_MEMORY_HINT = "ran out of memory; try a smaller batch (fewer samples or shorter sequences) or another --device"


def run_forward(model: nn.Module, batch: Batch, seed: int) -> Any:
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
        from gradcheck_cli.probe.tracker import where_forward_raises

        where = where_forward_raises(model, batch, seed)
        expected = expected_input(model)
        place = f" in {where}" if where else ""
        hint = f"; {expected}, the batch is {batch.describe()}" if expected else f"; the batch is {batch.describe()}"
        raise BatchError(f"the forward pass raised{place}: {type(exc).__name__}: {first_line(exc)}{hint}") from None


def run_backward(loss: torch.Tensor) -> None:
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


def cuda_devices(params: list[nn.Parameter]) -> list[int]:
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


class SavedBuffers:
    """Every non-boolean buffer of the model, copied, to give back later (boolean masks are left out: nothing
    updates them). A pass in train mode updates running statistics in place (BatchNorm), reading a parametrised
    weight runs spectral norm's power iteration, and a forward may even put a new tensor in a buffer's place."""

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module] | None = None) -> None:
        """``modules``: ``model.modules()``, where the caller has them already."""
        every = model.modules() if modules is None else modules
        self._slots = [(m, name, b) for m in every for name, b in m._buffers.items() if b is not None]
        self._copies = {id(b): b.detach().clone() for _, _, b in self._slots if b.dtype != torch.bool}

    def restore(self) -> None:
        """Every buffer back in its place, with the value it had."""
        with torch.no_grad():
            for module, name, original in self._slots:
                if id(original) in self._copies:
                    module._buffers[name] = original
                    original.copy_(self._copies[id(original)])


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer as it was (:class:`SavedBuffers`) when the block exits."""
    saved = SavedBuffers(model)
    try:
        yield
    finally:
        saved.restore()


@contextlib.contextmanager
def restored_state(model: nn.Module, params: list[nn.Parameter], keep_grads: bool = False) -> Iterator[SavedBuffers]:
    """Give back every module's ``training`` flag, every parameter's flags and gradient (unless ``keep_grads``),
    and every buffer a pass can update (:class:`SavedBuffers`, yielded for a caller that must restore them
    before a second pass)."""
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    flags = [(p, p.requires_grad, p.grad) for p in params]
    buffers = SavedBuffers(model, modules)
    attributes = SavedTensorAttributes(model, modules)
    try:
        yield buffers
    finally:
        for module, mode in training:
            if module.training is not mode:
                module.training = mode
        for p, requires_grad, grad in flags:
            if not keep_grads:
                p.grad = grad
            if p.is_floating_point() and p.requires_grad is not requires_grad:
                p.requires_grad_(requires_grad)
        buffers.restore()
        attributes.restore()


@dataclass(frozen=True)
class _Pass:
    """What the pass itself produced, beside the hooks' records."""

    loss: torch.Tensor
    choice: LossChoice
    output_max: list[torch.Tensor]
    hooks: bool
    mode: str
    autocast: str | None
    loss_scale: float
    graph: CallGraph | None = None
    output_grads: list[torch.Tensor] = dataclasses.field(default_factory=list)


def _collect(
    named: list[tuple[str, nn.Module]],
    params: list[nn.Parameter],
    frozen: set[int],
    recorder: ActivationGradientRecorder,
    activations: ActivationRecorder,
    run: _Pass,
    precision: bool,
) -> ProbeResult:
    """The shared readout (probe/readout.py) of the layers, plus what only a probe shows: the output's and the
    loss's finiteness, the gradient through time, the activations' health and, with ``precision``, the
    histograms of the half-precision forecast. Every parameter gradient's max |g| is taken with the forecast
    and under DDP/FSDP (the ranks reduce it); otherwise the readout takes it only where the norm is non-finite."""
    sharding = current_sharding()
    with_grad = {i: local(p.grad) for i, p in enumerate(params) if p.is_floating_point() and p.grad is not None}
    tensors = list(with_grad.values())
    maxima = precision or sharding is not None
    pairs = norms_and_max_abs(tensors) if maxima else [(n, None) for n in gradient_norms(tensors)]
    gradients: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = dict(zip(with_grad, pairs, strict=True))
    timed = sorted(recorder.time_norms)
    activation_values = activations.device_tensors()  # first: its samples are freed before the histograms' peak
    hist = torch.zeros(0)
    if precision:
        hist = layer_histograms(len(named), _histogram_inputs(named, [params[i] for i in gradients], recorder))
    extras = (
        Extra(run.output_max, MAX),
        Extra([run.loss.reshape(())], MEAN),
        Extra([recorder.time_norms[call_id] for call_id in timed], ACT_NORM),
        Extra([hist], PARAM_COUNT),
        Extra(activation_values, MEAN),
        Extra(run.output_grads, ACT_NORM),
    )
    scale = LossScale(run.loss_scale)
    reading = read_layers(
        named, params, gradients, recorder, frozen=frozen, extras=extras, sharding=sharding, scale=scale
    )
    out_values, (loss_value,), time_values, hist_values, activation_summaries, output_grads = reading.extras
    profile_of: dict[int, tuple[float, ...]] = {}
    offset = 0
    for call_id in timed:
        size = recorder.time_norms[call_id].numel()
        profile = tuple(v / run.loss_scale for v in time_values[offset : offset + size])
        profile_of.setdefault(recorder.calls[call_id][0], profile)
        offset += size
    shift = round(math.log2(run.loss_scale))
    return ProbeResult(
        layers=tuple(dataclasses.replace(m, time_profile=profile_of.get(i, ())) for i, m in enumerate(reading.layers)),
        call_order=reading.call_order,
        activation_hooks=run.hooks,
        loss=run.choice,
        loss_value=loss_value,
        mode=run.mode,
        output_finite=all(math.isfinite(v) for v in out_values),
        precision=tuple(shifted_histogram(hist_values[i * BINS : (i + 1) * BINS], shift) for i in range(len(named)))
        if precision
        else (),
        activations=activations.summarise(list(activation_summaries)),
        leaf_calls=tuple(activations.leaf_calls),
        autocast=run.autocast,
        loss_scale=run.loss_scale,
        graph=_folded(run.graph, len(reading.call_order)),
        output_grad=math.sqrt(sum(v * v for v in output_grads)) / run.loss_scale if output_grads else None,
    )


def _folded(graph: CallGraph | None, calls: int) -> CallGraph | None:
    """The graph of the calls as read (one micro-batch's); None when the readout kept another number of calls."""
    if graph is None or len(graph.depth) != calls:
        return None
    return graph


def _histogram_inputs(
    named: list[tuple[str, nn.Module]], with_grad: list[nn.Parameter], recorder: ActivationGradientRecorder
) -> list[tuple[int, torch.Tensor]]:
    """(layer index, tensor) of every dense parameter gradient and every activation-gradient sample."""
    owner: dict[int, int] = {}
    for index, (_, module) in enumerate(named):
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), index)
    pairs = [(owner[id(p)], local(p.grad)) for p in with_grad if p.grad is not None and not p.grad.is_sparse]
    for (layer, _), samples in zip(recorder.calls, recorder.samples, strict=True):
        pairs += [(layer, t) for t in samples]
    return pairs
