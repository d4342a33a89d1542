"""The one readout of ``inspect``'s probe and ``watch``'s recorder: every per-layer number (weights, parameter
gradients, output gradients per call) and the caller's own extras reduced on the device, reduced across ranks
once per kind when the model is distributed (distributed/reduce.py), copied to the host with one
synchronisation per device, and turned into :class:`~gradcheck_cli.probe.results.LayerMeasure` rows."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradcheck_cli.distributed.reduce import (
    ACT_MAX,
    ACT_NORM,
    MAX,
    NONE,
    PARAM_MAX,
    PARAM_NORM,
    Sharding,
    local,
    reduce_pieces,
    summed_over_ranks,
)
from gradcheck_cli.probe.modules import module_type
from gradcheck_cli.probe.norms import l2_norms, max_abs
from gradcheck_cli.probe.results import LayerMeasure, Norm


def to_host(tensors: list[torch.Tensor]) -> list[float]:
    """Every element of ``tensors``, flattened in order, with one synchronisation per device.

    Models on one device (the usual case) cost exactly one device-to-host copy. The tensors of one dtype are
    joined first and widened to float64 together (exactly: every value of a narrower type is a float64).
    """
    kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, t in enumerate(tensors):
        kinds.setdefault((t.device, t.dtype), []).append(index)
    by_device: dict[torch.device, list[tuple[list[int], torch.Tensor]]] = {}
    for (device, _), indices in kinds.items():
        joined = torch.cat([tensors[i].reshape(-1) for i in indices]) if len(indices) > 1 else tensors[indices[0]]
        by_device.setdefault(device, []).append((indices, joined.reshape(-1).to(torch.float64)))
    chunks: list[list[float]] = [[] for _ in tensors]
    for parts in by_device.values():
        flat = torch.cat([joined for _, joined in parts]).tolist() if len(parts) > 1 else parts[0][1].tolist()
        start = 0
        for indices, _ in parts:
            for i in indices:
                end = start + tensors[i].numel()
                chunks[i] = flat[start:end]
                start = end
    return [value for chunk in chunks for value in chunk]


class Readout:
    """The tensors to read, in order, and each one's kind of reduction (how it combines across ranks)."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.kinds: list[str] = []

    def add(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """Read ``tensors`` (every element, in order), reduced across ranks as ``kind``."""
        self.pieces.extend(tensors)
        self.kinds.extend([kind] * len(tensors))

    def add_activation_gradients(self, recorder: Any, sharding: Sharding | None) -> int:
        """(L2, max) of every output gradient the recorder holds, call by call; an output broadcast over the
        batch comes already summed over ranks. Returns how many pairs were added."""
        shared = summed_over_ranks(recorder, sharding)
        count = 0
        for call_id, call in enumerate(recorder.norms):
            for k, pair in enumerate(call):
                summed = (call_id, k) in shared  # already the whole batch's: nothing more to reduce
                l2, peak = shared.get((call_id, k), pair)
                self.add([l2], NONE if summed else ACT_NORM)
                self.add([peak], NONE if summed else ACT_MAX)
                count += 1
        return count

    def read(self, sharding: Sharding | None) -> Values:
        """Reduce across ranks (when distributed), then one copy to the host."""
        pieces = self.pieces
        if sharding is not None and pieces:
            pieces = reduce_pieces(pieces, self.kinds, sharding)
        return Values(to_host(pieces) if pieces else [])


class Values:
    """The host copies, taken in the order they were added."""

    def __init__(self, values: list[float]) -> None:
        self._values = values
        self._cursor = 0

    def take(self, count: int) -> list[float]:
        """The next ``count`` values."""
        out = self._values[self._cursor : self._cursor + count]
        self._cursor += count
        return out


@dataclass(frozen=True)
class LossScale:
    """The loss scale the gradients still carry when read (a GradScaler's device tensor, read in the same
    synchronisation, or a number); every gradient number is divided by it, so all read unscaled."""

    value: torch.Tensor | float | None = None
    parameters: bool = True
    """False when the parameter gradients no longer carry it (read after ``scaler.unscale_``)."""


@dataclass(frozen=True)
class Extra:
    """Tensors a caller reads along with the layers (in the same synchronisation), and their reduction."""

    tensors: Sequence[torch.Tensor]
    kind: str


@dataclass(frozen=True)
class Reading:
    """The layers as read, and what the callers need beyond them."""

    layers: tuple[LayerMeasure, ...]
    call_order: tuple[tuple[int, int], ...]
    """Every forward call of one micro-batch as (layer index, call index of that layer), in forward order."""
    per_call: tuple[Norm | None, ...]
    """‖∂L/∂output‖ of every recorded call (all micro-batches, unscaled), by call id."""
    grads: Mapping[int, tuple[float, float | None]]
    """Per parameter index: (L2, max |g|) of its gradient, as read (still carrying the loss scale)."""
    total_norm: float
    """‖∂L/∂θ‖ (unscaled) with every parameter counted once (a tied embedding and output layer share one)."""
    scale: float | None
    """The loss scale as read (None without one)."""
    micro_batches: int
    extras: tuple[tuple[float, ...], ...]
    """The values of each :class:`Extra`, in the order given."""


def read_layers(
    named: Sequence[tuple[str, nn.Module]],
    params: Sequence[nn.Parameter],
    gradients: Mapping[int, tuple[torch.Tensor, torch.Tensor | None]],
    recorder: Any,
    *,
    frozen: Set[int],
    extras: Sequence[Extra] = (),
    sharding: Sharding | None = None,
    scale: LossScale = LossScale(),
    backward_passes: int = 1,
) -> Reading:
    """Read every layer's numbers and the ``extras`` in one synchronisation.

    ``params``: each parameter of ``named`` once (probe/modules.py: ``unique_params``); ``gradients``: per index
    into ``params``, (L2, max |g|) of its gradient as 0-dim device tensors, where a max left None is taken only
    if the norm reads non-finite (:func:`_lazy_maxima`; one process, not distributed); ``recorder``: the
    :class:`~gradcheck_cli.probe.recorder.ActivationGradientRecorder` of the pass; ``frozen``: ids of the
    parameters that do not train; ``scale``: the loss scale to divide out. The calls of ``backward_passes``
    micro-batches fold into one (:func:`fold`).
    """
    floats = [p for p in params if p.is_floating_point()]
    grad_ids = sorted(gradients)
    readout = Readout()
    readout.add(l2_norms([local(p.detach()) for p in floats]) if floats else [], PARAM_NORM)
    readout.add([gradients[i][0] for i in grad_ids], PARAM_NORM)
    maxima = {i: top for i in grad_ids if (top := gradients[i][1]) is not None}
    measured_max = list(maxima)
    readout.add(list(maxima.values()), PARAM_MAX)
    act_pairs = readout.add_activation_gradients(recorder, sharding)
    readout.add(recorder.output_max, MAX)
    for extra in extras:
        readout.add(extra.tensors, extra.kind)
    if isinstance(scale.value, torch.Tensor):  # a GradScaler's: read in the same synchronisation
        readout.add([scale.value.detach().float().mean().reshape(1)], NONE)
    take = readout.read(sharding).take

    weight_of = dict(zip(map(id, floats), take(len(floats)), strict=True))
    grad_l2 = dict(zip(grad_ids, take(len(grad_ids)), strict=True))
    grad_max: dict[int, float | None] = dict(zip(measured_max, take(len(measured_max)), strict=True))
    act_values = take(2 * act_pairs)
    call_out = take(len(recorder.output_max))
    extra_values = tuple(tuple(take(sum(t.numel() for t in extra.tensors))) for extra in extras)
    scale_value = take(1)[0] if isinstance(scale.value, torch.Tensor) else _number(scale.value)
    if len(grad_max) < len(grad_l2):
        grad_max |= _lazy_maxima(params, grad_l2, grad_max, sharding)
    grads = {i: (grad_l2[i], grad_max[i]) for i in grad_ids}
    divide = scale_value if scale_value and scale_value > 0 else 1.0
    param_divide = divide if scale.parameters else 1.0

    per_call: list[Norm | None] = []
    offset = 0
    for call in recorder.norms:
        pairs = [(act_values[offset + 2 * k], act_values[offset + 2 * k + 1]) for k in range(len(call))]
        offset += 2 * len(call)
        per_call.append(combine(pairs, divide))
    order, calls_of, outs_of, micro = fold(recorder.calls, per_call, call_out, backward_passes, len(named))

    index_of = {id(p): i for i, p in enumerate(params)}
    layers = []
    for layer, (name, module) in enumerate(named):
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        own_grads = [grads[index_of[id(p)]] for p in own if index_of[id(p)] in grads]
        layers.append(
            LayerMeasure(
                name=name,
                type=module_type(module),
                params=sum(p.numel() for p in module.parameters(recurse=False)),
                frozen=bool(own) and all(id(p) in frozen for p in own),
                weight_norm=math.sqrt(sum(weight_of[id(p)] ** 2 for p in own)),
                grad=combine(own_grads, param_divide),
                calls=tuple(calls_of[layer]),
                output_max=peak(outs_of[layer]) if outs_of[layer] else None,
            )
        )
    total = math.sqrt(sum(l2 * l2 for l2, _ in grads.values())) / param_divide
    return Reading(tuple(layers), tuple(order), tuple(per_call), grads, total, scale_value, micro, extra_values)


def _lazy_maxima(
    params: Sequence[nn.Parameter],
    l2: Mapping[int, float],
    known: Mapping[int, float | None],
    sharding: Sharding | None,
) -> dict[int, float | None]:
    """The max |g| of each gradient whose maximum was not measured: read now where its norm is NaN or Inf (a NaN
    or Inf element, or a sum of squares beyond float32's range with every element finite); None where the norm
    is finite (then so is every element, which is all the diagnosis reads of it). Only the probe defers maxima,
    and it reads right after its backward; a gradient that is nonetheless gone keeps its non-finite norm as the
    max (read as non-finite)."""
    if sharding is not None:
        raise ValueError("a distributed readout measures every gradient's maximum")
    missing = [i for i in l2 if i not in known]
    found: dict[int, float | None] = {i: None if math.isfinite(l2[i]) else l2[i] for i in missing}
    alive = [i for i in missing if not math.isfinite(l2[i]) and params[i].grad is not None]
    if alive:
        peaks = to_host([max_abs(local(g.detach())) for g in (params[i].grad for i in alive) if g is not None])
        found |= dict(zip(alive, peaks, strict=True))
    return found


def _number(value: float | None) -> float | None:
    return None if value is None else float(value)


def fold(
    calls: Sequence[tuple[int, int]],
    per_call: Sequence[Norm | None],
    outs: Sequence[float],
    backward_passes: int,
    n_layers: int,
) -> tuple[list[tuple[int, int]], list[list[Norm | None]], list[list[float]], int]:
    """Fold the micro-batches of a gradient-accumulation step into one: call k of every micro-batch
    combines (√Σ of squares: the norm over the whole batch), when every micro-batch made the same calls.

    The number of micro-batches is the number of backward passes that accumulated into the step. Returns
    the calls of one micro-batch, each layer's norms and output maxima per call, and the micro-batches.
    """
    layers_seq = [layer for layer, _ in calls]
    micro = _micro_batches(layers_seq, backward_passes)
    size = len(layers_seq) // micro
    calls_of: list[list[Norm | None]] = [[] for _ in range(n_layers)]
    outs_of: list[list[float]] = [[] for _ in range(n_layers)]
    for position, layer in enumerate(layers_seq[:size]):
        group = [position + k * size for k in range(micro)]
        if micro == 1:
            calls_of[layer].append(per_call[position])
        else:
            norms = [per_call[i] for i in group]
            calls_of[layer].append(combine([(n.l2, n.max_abs) for n in norms if n is not None]))
        if outs:
            outs_of[layer].append(peak([outs[i] for i in group]))
    return list(calls[:size]), calls_of, outs_of, micro


def _micro_batches(sequence: list[int], backward_passes: int) -> int:
    """How many micro-batches to fold: the number of backward passes, when the calls repeat that often."""
    n = len(sequence)
    k = backward_passes
    if k <= 1 or n == 0 or n % k:
        return 1
    size = n // k
    return k if all(sequence[i] == sequence[i % size] for i in range(n)) else 1


def combine(pairs: Sequence[tuple[float, float | None]], divide: float = 1.0) -> Norm | None:
    """One norm over several tensors, divided by the loss scale: √Σ‖·‖², and the largest |element| (None when one
    of the maxima was not measured and the measured ones are finite: then it is unknown, though finite)."""
    if not pairs:
        return None
    l2 = math.sqrt(sum(l2 * l2 for l2, _ in pairs)) / divide
    maxima = [m for _, m in pairs if m is not None]
    if len(maxima) < len(pairs) and all(math.isfinite(m) for m in maxima):
        return Norm(l2, None)
    return Norm(l2, peak(maxima) / divide)


def peak(values: Sequence[float]) -> float:
    """The largest value, NaN if any is NaN (``max`` would drop it depending on position)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values)
