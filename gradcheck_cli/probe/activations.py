"""Activation health on the probe's own forward pass: saturated sigmoid/tanh units, dead ReLUs, φ'(z).

A forward *pre*-hook sees each activation module's pre-activation z before the module runs (so
``ReLU(inplace=True)`` cannot overwrite it first) and reduces it on the device: the sum of φ'(z)²
(the activation's share of the seed's per-layer factor σ'(z)·w) and the count of saturated elements
(φ'(z) below 1 % of its maximum), both over a strided sample of at most 4096 elements per call
(shares to about ±1.5 %), and, for the ReLU family, over all of z, the units that were ≤ 0 for every
sample. The same hooks record the order of every leaf-module call, which the init audit uses to
find the activation that follows each weight. Nothing is synchronised here; hooks live in an
ExitStack and are gone when the block exits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradcheck_cli.diagnose.module_kinds import DEAD_UNITS_MEASURED, DERIVATIVE_MEASURED
from gradcheck_cli.probe.precision import sample
from gradcheck_cli.probe.recorder import HookStack
from gradcheck_cli.probe.results import ActivationTotals

SATURATION_BOUND = 0.01
"""A unit is saturated where φ'(z) is below this fraction of φ's largest derivative."""
TANH_SATURATION = math.acosh(1.0 / math.sqrt(SATURATION_BOUND))
"""|z| beyond which 1 − tanh²(z) < 1 % (≈ 2.99)."""
SIGMOID_SATURATION = math.log((1 + math.sqrt(1 - SATURATION_BOUND)) / (1 - math.sqrt(1 - SATURATION_BOUND)))
"""|z| beyond which σ'(z) < 1 % of σ'(0) = 1/4 (≈ 5.99)."""

CHANNEL_FIRST = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
PASS_THROUGH = frozenset({"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"})
SHAPE_KEEPING = DERIVATIVE_MEASURED | PASS_THROUGH
"""Leaves that hand on their input's layout: the producer of an activation's input is the last call before them
(a residual block's ReLU after an ``nn.Identity`` shortcut is fed by the block's BatchNorm, channels first)."""
CHANNEL_FIRST_NORMS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d")


@dataclass
class ActivationCall:
    """Device-side sums of one activation call (0-dim tensors; read after the single sync)."""

    module: int
    elements: int
    sampled: int
    """Elements in the strided sample the derivative and saturation sums are over."""
    dead_units: torch.Tensor | None
    units: int
    derivative_sq: torch.Tensor | None = None
    """Σ φ'(z)² over the sample: reduced with the other calls of its kind (:meth:`ActivationRecorder.reduce`)."""
    saturated: torch.Tensor | None = None
    """Saturated elements of the sample (Sigmoid/Tanh, Hardtanh/Hardsigmoid), reduced like ``derivative_sq``."""


def derivative(kind: str, z: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """φ'(z) of the activation ``kind`` (float32 or wider)."""
    if kind == "Sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if kind == "Tanh":
        return 1 - torch.tanh(z).square()
    if kind == "ReLU":
        return (z > 0).to(z.dtype)
    if kind == "ReLU6":
        return ((z > 0) & (z < 6)).to(z.dtype)
    if kind == "LeakyReLU":
        slope = float(getattr(module, "negative_slope", 0.01))
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    if kind == "Hardtanh":
        low, high = float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0))
        return ((z > low) & (z < high)).to(z.dtype)
    if kind == "Hardsigmoid":
        return ((z > -3) & (z < 3)).to(z.dtype) / 6
    if kind == "GELU":
        normal = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * normal
    if kind == "SiLU":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if kind == "ELU":
        alpha = float(getattr(module, "alpha", 1.0))
        return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(z))
    raise ValueError(kind)


def unit_peaks(z: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """max of ``z`` over every dimension but ``unit_dim``: each unit's largest pre-activation over the batch and
    every position. A contiguous ``z`` is reduced along memory first (the positions after the unit, then what
    is before it): on a CPU that reads all of ResNet-50's 4×256×56×56 input in 83 µs, where a strided sample
    of 1/16 of it took 389 µs and one reduction over (0, 2, 3) 124 µs."""
    if not z.is_contiguous():
        return torch.amax(z, dim=[d for d in range(z.dim()) if d != unit_dim])
    if unit_dim < z.dim() - 1:
        z = z.flatten(unit_dim + 1).amax(dim=-1)
    return z.flatten(0, unit_dim - 1).amax(dim=0) if unit_dim > 0 else z


PENDING_CALLS = 32
"""Samples kept for a batched reduction at most (32 × 16 KB): reduced as the forward pass goes, so they and the
reduction's temporaries stay far below the pass's own peak (the gradients at the end of backward)."""


_Group = tuple[str, tuple[float, ...], torch.dtype, torch.device]
"""Calls reduced together: the activation's kind, what else φ' depends on, the sample's dtype and device."""


def _derivative_parameters(kind: str, module: nn.Module) -> tuple[float, ...]:
    """What φ' depends on beyond the kind (calls that agree on it are reduced together)."""
    if kind == "LeakyReLU":
        return (float(getattr(module, "negative_slope", 0.01)),)
    if kind == "Hardtanh":
        return (float(getattr(module, "min_val", -1.0)), float(getattr(module, "max_val", 1.0)))
    if kind == "ELU":
        return (float(getattr(module, "alpha", 1.0)),)
    return ()


def saturation_limit(kind: str) -> float | None:
    """|z| beyond which the unit counts as saturated, or None for non-saturating activations."""
    return {"Sigmoid": SIGMOID_SATURATION, "Tanh": TANH_SATURATION}.get(kind)


class ActivationRecorder(HookStack):
    """Leaf-call order and activation statistics of one forward pass, inside a ``with`` block."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._leaves = [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]
        self.leaf_calls: list[tuple[str, str]] = []
        """(name, class name) of every leaf-module call, in forward order."""
        self.calls: list[ActivationCall] = []
        self.modules: list[tuple[str, str]] = []
        """(name, class name) of the measured activation modules; ``ActivationCall.module`` indexes it."""
        self._index: dict[int, int] = {}
        self._pending: dict[_Group, tuple[nn.Module, list[tuple[ActivationCall, torch.Tensor]]]] = {}
        """Calls whose samples wait to be reduced with the others of their kind (:meth:`reduce`)."""
        self._pending_calls = 0

    def _register(self) -> None:
        for name, module in self._leaves:
            self._stack.enter_context(module.register_forward_pre_hook(self._hook(name, module)))

    def _hook(self, name: str, module: nn.Module) -> Any:
        kind = type(module).__name__

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            previous = self.leaf_calls[-1][1] if self.leaf_calls else ""
            producer = next((t for _, t in reversed(self.leaf_calls) if t not in SHAPE_KEEPING), previous)
            self.leaf_calls.append((name, kind))
            if kind not in DERIVATIVE_MEASURED or not args or not isinstance(args[0], torch.Tensor):
                return
            z = args[0]
            if not z.is_floating_point() or z.numel() == 0:
                return
            self._measure(id(module), name, kind, module, z.detach(), producer)

        return hook

    def _measure(self, key: int, name: str, kind: str, module: nn.Module, z: torch.Tensor, producer: str) -> None:
        if key not in self._index:
            self._index[key] = len(self.modules)
            self.modules.append((name, kind))
        with torch.no_grad():
            # shares and means need no more than a strided sample (a copy: an in-place ReLU overwrites z next);
            # dead units need all of z
            part = sample(z).clone()
            dead, units = None, 0
            if kind in DEAD_UNITS_MEASURED and z.dim() >= 2:
                unit_dim = 1 if z.dim() >= 3 and producer.startswith(CHANNEL_FIRST + CHANNEL_FIRST_NORMS) else -1
                peak = unit_peaks(z, unit_dim % z.dim())
                dead, units = (peak <= 0).sum(), peak.numel()
        call = ActivationCall(self._index[key], z.numel(), part.numel(), dead, units)
        self.calls.append(call)
        group: _Group = (kind, _derivative_parameters(kind, module), part.dtype, part.device)
        self._pending.setdefault(group, (module, []))[1].append((call, part))
        self._pending_calls += 1
        if self._pending_calls >= PENDING_CALLS:
            self.reduce()

    def reduce(self) -> None:
        """φ'(z)² sums and saturated counts of the calls not reduced yet, a few kernels per kind of activation and
        sample size: the samples stacked, each row summed (the 49 Tanh calls of an MLP: ~12 kernels instead of
        ~400)."""
        with torch.no_grad():
            for (kind, _, _, _), (module, members) in self._pending.items():
                by_size: dict[int, list[tuple[ActivationCall, torch.Tensor]]] = {}
                for call, part in members:
                    by_size.setdefault(part.numel(), []).append((call, part))
                limit = saturation_limit(kind)
                for same in by_size.values():
                    parts = torch.stack([part for _, part in same])
                    slope = derivative(kind, parts, module)
                    sums = slope.square().sum(dim=1)
                    counts = None
                    if limit is not None:
                        counts = (parts.abs() > limit).sum(dim=1)
                    elif kind in ("Hardtanh", "Hardsigmoid"):
                        counts = (slope == 0).sum(dim=1)
                    for index, (call, _) in enumerate(same):
                        call.derivative_sq = sums[index]
                        call.saturated = None if counts is None else counts[index]
        self._pending.clear()
        self._pending_calls = 0

    def device_tensors(self) -> list[torch.Tensor]:
        """Every statistic to copy to the host, in the order :meth:`summarise` reads them back: each kind of
        statistic (φ'(z)² sums, saturated counts, dead units) over all calls, stacked and widened to float64."""
        self.reduce()
        kinds = (
            [c.derivative_sq for c in self.calls if c.derivative_sq is not None],
            [c.saturated for c in self.calls if c.saturated is not None],
            [c.dead_units for c in self.calls if c.dead_units is not None],
        )
        if len({t.device for t in kinds[0]}) > 1:  # a model split over devices: one by one
            return [t.reshape(1).double() for kind in kinds for t in kind]
        return [torch.stack([t.reshape(()) for t in kind]).double() for kind in kinds if kind]

    def summarise(self, values: list[float]) -> tuple[ActivationTotals, ...]:
        """Per activation module, the totals over its calls, from the host copies of :meth:`device_tensors`."""
        totals = [ActivationTotals(name, kind) for name, kind in self.modules]
        derivatives = iter(values[: len(self.calls)])
        saturated = iter(values[len(self.calls) :])
        dead = iter(values[len(self.calls) + sum(c.saturated is not None for c in self.calls) :])
        for call in self.calls:
            total = totals[call.module]
            total.calls += 1
            total.elements += call.elements
            total.sampled += call.sampled
            total.derivative_sq += next(derivatives)
            if call.saturated is not None:
                total.saturated = (total.saturated or 0.0) + next(saturated)
            if call.dead_units is not None:
                total.dead = (total.dead or 0.0) + next(dead)
                total.units += call.units
                total.samples_per_unit = max(total.samples_per_unit, call.elements // max(call.units, 1))
        return tuple(totals)
