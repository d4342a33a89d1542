"""What one probe or one recorded training step measured, as plain host values: the one set of types that
``inspect``'s probe and ``watch``'s recorder fill (through the same readout, probe/readout.py) and that
diagnosis, the watch log and ``gradcheck history`` read. No torch here, so reading a history never imports it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LossChoice:
    """Which loss was used and why, in words a user can check."""

    kind: str
    """``model``, ``cross_entropy``, ``mse`` or ``random_projection``."""
    description: str


@dataclass
class ActivationTotals:
    """One activation module's sums over all its calls, on the host."""

    name: str
    type: str
    calls: int = 0
    elements: int = 0
    sampled: int = 0
    derivative_sq: float = 0.0
    saturated: float | None = None
    dead: float | None = None
    units: int = 0
    samples_per_unit: int = 0


@dataclass(frozen=True)
class Norm:
    """An L2 norm and the largest absolute element of the same tensor(s)."""

    l2: float
    max_abs: float | None
    """None where it was not measured: a probe without the half-precision forecast reads a parameter gradient's
    maximum only when its norm is non-finite (probe/readout.py), so None says every element was finite."""

    @property
    def finite(self) -> bool:
        """Whether every element was finite (a NaN or Inf element makes ``max_abs`` non-finite; a norm can
        overflow while every element is finite)."""
        return True if self.max_abs is None else math.isfinite(self.max_abs)


@dataclass(frozen=True)
class LayerMeasure:
    """What one probe measured for one module that owns parameters."""

    name: str
    type: str
    params: int
    frozen: bool
    weight_norm: float
    grad: Norm | None
    """Gradient of the parameters it owns; None when no gradient reached any of them."""
    calls: tuple[Norm | None, ...]
    """‖∂L/∂output‖ per forward call; None for a call whose output got no gradient."""
    time_profile: tuple[float, ...] = ()
    """Fused recurrent modules: ‖∂L/∂x_t‖ per time step of the first call (the gradient through time)."""
    output_max: float | None = None
    """``watch`` only: max |element| of its outputs over the step's calls; non-finite when the forward made NaN/Inf."""


@dataclass(frozen=True)
class CallGraph:
    """Where each forward call sits in the autograd graph, read before backward (probe/graph.py).

    Every tuple is indexed like ``ProbeResult.call_order``. A call's depth is the number of hooked calls on the
    longest chain from its output to the loss along ``grad_fn`` edges, itself included (1: its output reaches the
    loss through no other hooked call), so it does not depend on the order modules were called in.
    """

    depth: tuple[int | None, ...]
    """Per call: its depth from the loss; None when its output does not lie on any path to the loss."""
    next: tuple[tuple[int, ...], ...]
    """Per call: the calls nearest to it towards the loss (the next hooked calls on its paths to the loss)."""
    direct: tuple[bool, ...]
    """Per call: whether its output reaches the loss through no other hooked call (an output end)."""
    unused_output: tuple[bool, ...]
    """Per call: not on a path to the loss, but its output reaches a model output the loss did not use."""
    tail_ops: tuple[str, ...] = ()
    """The autograd operations between the output ends and the loss (``SoftmaxBackward0``...), nearest the
    loss first: what the gradient passes through before it reaches any layer."""


@dataclass(frozen=True)
class ProbeResult:
    """The raw measurements of one probe (or of one recorded training step), before any diagnosis."""

    layers: tuple[LayerMeasure, ...]
    call_order: tuple[tuple[int, int], ...]
    """Every forward call as (layer index, call index of that layer), in forward order."""
    activation_hooks: bool
    """Whether module hooks could fire (False for TorchScript): activation gradients measured."""
    loss: LossChoice
    loss_value: float
    mode: str
    output_finite: bool
    """Whether every floating-point element of the model's output was finite."""
    precision: tuple[tuple[float, ...], ...] = ()
    """Per layer: exponent histogram of its parameter and activation gradients (unscaled)."""
    activations: tuple[ActivationTotals, ...] = ()
    """Per activation module: saturation, dead units and φ'(z) sums over its calls."""
    leaf_calls: tuple[tuple[str, str], ...] = ()
    """(name, class name) of every leaf-module call in forward order."""
    autocast: str | None = None
    """``fp16``/``bf16`` when the pass ran under autocast."""
    loss_scale: float = 1.0
    """What the loss was multiplied by before backward; every gradient number is divided back."""
    graph: CallGraph | None = None
    """The calls' places in the autograd graph (``inspect``'s probe); None where only forward order is known."""
    output_grad: float | None = None
    """‖∂L/∂output‖ over the outputs the loss used (unscaled); None where not measured."""
