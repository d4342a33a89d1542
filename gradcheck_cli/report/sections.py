"""The frozen sections that explain a diagnosis: init audit, activation health, precision, first
non-finite, verified fixes and the optimisation probe. No torch here: renderers import it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InitLayer:
    """One Linear/Conv/RNN weight's standard deviation against the standard initialisations."""

    layer: str
    type: str
    fan_in: int
    fan_out: int
    std: float
    """√mean(w²): the standard deviation of the zero-mean distribution an init draws from."""
    activation: str
    """The activation that follows it in the forward pass (``linear`` when none is seen, ``unknown`` for a
    layer that never runs as a module, such as ``nn.MultiheadAttention.out_proj``)."""
    gain: float
    """``nn.init.calculate_gain`` of that activation."""
    xavier_std: float
    """What Xavier (Glorot) would give: gain·√(2/(fan_in+fan_out))."""
    kaiming_std: float
    """What Kaiming (He, fan_in) would give: gain/√fan_in — the scale that keeps the signal's variance."""
    ratio: float
    """std / kaiming_std: the factor this layer multiplies the gradient by, beyond what its activation needs."""
    looks_like: str
    """The scheme whose scale is closest (``kaiming``, ``xavier``, ``pytorch_default``, ``orthogonal``,
    ``lecun``, ``unknown``...)."""
    normalised: bool = False
    """A normalisation layer follows before the next weight: its scale does not compound."""
    flag: str | None = None
    """``too_small`` or ``too_large`` when the scale is far from what the activation needs."""


@dataclass(frozen=True)
class InitAudit:
    """The initialisation audit of a whole model."""

    layers: tuple[InitLayer, ...]
    skipped: str | None = None
    """Why the audit does not apply (a trained checkpoint), or None when it ran."""
    trained_layers: tuple[str, ...] = ()
    """Layers whose weights no longer look like an initialisation (statistics in docs/init_audit.md)."""


@dataclass(frozen=True)
class ActivationLayer:
    """How one activation module's units behaved on the batch."""

    layer: str
    type: str
    calls: int
    elements: int
    """Pre-activation elements seen over all calls (φ'(z) and saturation are estimated from a strided sample of
    at most 4096 per call; dead units from all of them)."""
    derivative_rms: float
    """√mean φ'(z)²: the activation's share of the per-layer gradient factor σ'(z)·w."""
    saturated: float | None = None
    """Sigmoid/tanh family: share of pre-activations where φ'(z) < 1 % of its maximum."""
    dead: float | None = None
    """ReLU family: share of units that were ≤ 0 for every sample of the batch (at evenly strided positions:
    at most about 1024 values per unit)."""
    samples_per_unit: int = 0
    """How many values each unit was judged on: dead shares are only meaningful from about 8."""
    flag: str | None = None
    """``saturated`` or ``dead`` when beyond the calibrated threshold."""


@dataclass(frozen=True)
class PrecisionLayer:
    """The share of one layer's gradient elements that half precision would lose."""

    layer: str
    elements: int
    """Elements examined (a strided sample of at most 4096 per tensor)."""
    zero: float
    """Share already exactly zero in float32 (not lost, not counted below)."""
    fp16_flush: float
    """Share of non-zero elements below half fp16's smallest subnormal (2⁻²⁵ ≈ 2.98e-8): they round to 0."""
    fp16_subnormal: float
    """Share of non-zero elements below fp16's smallest normal (6.10e-5): they lose precision."""
    fp16_overflow: float
    """Share above fp16's largest value (65504): they become Inf."""
    bf16_flush: float
    """Share of non-zero elements that round to 0 in bf16 (below 2⁻¹³⁴ ≈ 4.6e-41)."""
    max_abs: float
    fp16_flush_scaled: float = 0.0
    """``fp16_flush`` after multiplying by the recommended loss scale."""


@dataclass(frozen=True)
class Precision:
    """What fp16 and bf16 would do to this model's gradients."""

    layers: tuple[PrecisionLayer, ...]
    recommended_scale: float
    """The largest power of two that keeps every gradient below fp16's maximum (GradScaler-style)."""
    autocast: str | None = None
    """``fp16`` or ``bf16`` when the probe itself ran under autocast."""
    scale_used: float = 1.0
    """The loss scale the autocast probe multiplied by (its norms are reported unscaled)."""
    lost: tuple[tuple[str, float], ...] = ()
    """Autocast runs: (layer, share of its activation-gradient elements that were zero in half precision but
    not in float32)."""


@dataclass(frozen=True)
class TensorSummary:
    """What a tensor looked like where something went non-finite."""

    shape: tuple[int, ...]
    nan: int
    inf: int
    finite_min: float | None
    finite_max: float | None
    finite_abs_mean: float | None


@dataclass(frozen=True)
class NonFiniteOrigin:
    """Where NaN/Inf first appeared, in forward and in backward order."""

    forward_module: str | None
    """The first module (forward order) whose output held NaN/Inf while its inputs were finite."""
    forward_type: str | None = None
    forward_inputs: tuple[TensorSummary, ...] = ()
    forward_output: TensorSummary | None = None
    non_finite_parameters: tuple[str, ...] = ()
    """Parameters of that module that are NaN/Inf themselves."""
    backward_module: str | None = None
    """The first module (backward order) whose output gradient held NaN/Inf."""
    backward_type: str | None = None
    backward_grad: TensorSummary | None = None


@dataclass(frozen=True)
class Outcome:
    """The headline numbers of one probe, before or after a fix."""

    status: str
    problems: tuple[str, ...]
    attenuation: float | None
    gain: float | None
    finite: bool = True
    through_time: float | None = None
    """Fused RNN/LSTM/GRU: the first-step / last-step gradient farthest from 1, when there is one."""


@dataclass(frozen=True)
class Verification:
    """A recommendation applied to a copy of the model and re-probed on the same batch."""

    id: str
    """The recommendation's id."""
    verified: bool
    """False when it could not be applied in memory (``reason`` says why)."""
    applied: str = ""
    """What was done to the copy, in plain words."""
    before: Outcome | None = None
    after: Outcome | None = None
    effect: float | None = None
    """Orders of magnitude the attenuation moved towards 1 (positive: better)."""
    fixed: bool = False
    """Whether the copy's verdict became healthy."""
    reason: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class StepRecord:
    """One recorded step: the optimisation probe's, or a training history's."""

    step: int
    loss: float
    """NaN when the training loop gave no loss to ``step()``."""
    grad_norm: float
    """Total gradient norm over all parameters."""
    attenuation: float | None
    gain: float | None
    layer_grad_norms: tuple[float, ...]
    """‖∂L/∂W‖ per layer, in the order of ``OptimisationTrace.layers``."""


@dataclass(frozen=True)
class OptimisationTrace:
    """N optimiser steps on the sample batch, on a copy of the model."""

    optimizer: str
    lr: float
    layers: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    verdict: str
    """``stable``, ``exploding``, ``collapsing`` or ``non_finite``."""
    onset_step: int | None = None
    """The first step where the trend left the healthy band."""
    loss: str = ""
    """The loss the steps minimised, in words: the batch's target, the model's own loss, or (without either) the
    bounded surrogate, a mean squared error towards a fixed random target (docs/calibration.md)."""


@dataclass(frozen=True)
class Onset:
    """Where one problem began in a training history."""

    problem: str
    """``vanishing``, ``exploding`` or ``non_finite``."""
    step: int
    """The first step showing it: the first recorded step, or for a NaN/Inf loss the exact step."""
    last_healthy_step: int | None
    """The last recorded step before it that was healthy: the problem began after this one."""
    codes: tuple[str, ...]
    """Rule codes that flagged it at the onset."""
    layers: tuple[str, ...]
    """Layers involved at the onset (flagged, or named as the first NaN/Inf)."""
    message: str
    resolved_step: int | None = None
    """The first record of the final stretch without it, when the run recovered; None while it lasts."""
    grown: tuple[tuple[str, float], ...] = ()
    """Exploding: the layers whose ‖∂L/∂W‖ grew most from the last healthy record to the onset (name, factor)."""


@dataclass(frozen=True)
class TrainingHistory:
    """The gradients of a training run, as ``watch`` recorded them every ``every`` steps."""

    source: str
    every: int
    """``watch(every=N)``: one record every N steps."""
    records: int
    layers: tuple[str, ...]
    steps: tuple[StepRecord, ...]
    """One per recorded step: loss (NaN when not given), total norm, attenuation, gain, ‖∂L/∂W‖ per layer."""
    verdict: str
    """``healthy``, or the problems in onset order, comma-separated; problems that training repaired follow in
    parentheses (``vanishing until step 120``)."""
    onsets: tuple[Onset, ...] = ()
    problem_steps: tuple[tuple[int, tuple[str, ...]], ...] = ()
    """(step, problems) of every unhealthy record."""
    gain_first: float | None = None
    gain_last: float | None = None
    gain_trend: float | None = None
    """Change of log10(gain) per 1000 steps over the healthy records (least squares); None with < 3 of them."""
    healthy_norm_median: float | None = None
    """Median total gradient norm of the records before the first problem (all records when healthy)."""
    healthy_norm_max: float | None = None
    clip_max_norm: float | None = None
    """The ``max_norm`` the history suggests for ``clip_grad_norm_``: 2 × the healthy median, 2 significant digits."""
    earlier_runs: int = 0
    """Runs earlier in the same file (each ``watch`` block appends a header); only the last is read."""
    skipped_lines: int = 0
    """Lines that could not be read (a crash mid-write truncates the last)."""
