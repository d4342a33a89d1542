"""The frozen report: the one value every renderer reads (DESIGN.md §3)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from gradcheck_cli.report.sections import (
    ActivationLayer,
    InitAudit,
    NonFiniteOrigin,
    OptimisationTrace,
    Precision,
    TrainingHistory,
    Verification,
)

SCHEMA_VERSION = 1
NOT_MEASURED = "not_measured"
"""``PathSummary.measured_with`` and ``status`` when nothing measured could see the backward path."""
STATUSES = ("healthy", "unhealthy", NOT_MEASURED)
"""The report's ``status`` values: no problem and the path measured; problems; no problem found but the path
could not be measured (a TorchScript program without hooks and without two biases), which is no verdict of
health."""


class Problem(str, Enum):
    """A gradient pathology that makes a model unhealthy."""

    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NON_FINITE = "non_finite"


class Severity(str, Enum):
    """How much a finding matters; ``--fail-on`` compares against it."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """Order of severities: info < warning < error."""
        return ("info", "warning", "error").index(self.value)


@dataclass(frozen=True)
class LayerStats:
    """Gradient statistics of one module that owns parameters, measured on one pass."""

    name: str
    """The module's name as ``named_modules()`` gives it (``""`` for the root)."""
    type: str
    """The module's class name (``Linear``, ``Conv2d``, ``GPT2Attention``...)."""
    position: int
    """Index of the module's first forward call among all calls (-1: never called)."""
    calls: int
    """How often the module ran in the forward pass."""
    params: int
    """Number of parameters the module owns directly."""
    frozen: bool
    """Whether the user had ``requires_grad=False`` on all of its parameters."""
    weight_norm: float
    """L2 norm of the parameters it owns directly."""
    grad_norm: float | None
    """L2 norm of the gradients of those parameters; None when no gradient reached them."""
    act_grad_norm: float | None
    """‖∂L/∂output‖ over all calls; None when it could not be measured or never reached."""
    act_grad_norms: tuple[float, ...] = ()
    """‖∂L/∂output‖ of each call, in forward order (recurrent cells run many times)."""
    act_grad_rel: float | None = None
    """``act_grad_norm`` divided by the activation gradient at the output end of the path."""
    time_grad_norms: tuple[float, ...] = ()
    """Fused RNN/LSTM/GRU: ‖∂L/∂x_t‖ per time step, the gradient through time (first call)."""
    flags: tuple[str, ...] = ()
    """Problems seen in this layer (``vanishing``, ``exploding``, ``non_finite``, ``no_gradient``)."""
    depth: int | None = None
    """Layers on the longest chain from this layer's output to the loss along the autograd graph, itself
    included (1: feeds the loss directly; its deepest call when it runs several times); None when it lies on
    no path to the loss or the graph was not read (watch, TorchScript)."""

    @property
    def grad_weight_ratio(self) -> float | None:
        """‖∂L/∂W‖ / ‖W‖: the relative size of a plain SGD step at learning rate 1."""
        if self.grad_norm is None or self.weight_norm == 0:
            return None
        return self.grad_norm / self.weight_norm


@dataclass(frozen=True)
class Finding:
    """One thing the diagnosis found, with a stable rule code."""

    code: str
    """Stable rule code (``GC001``...), never renumbered; see docs/rules.md."""
    name: str
    """Short rule name (``vanishing-gradient``)."""
    severity: Severity
    problem: Problem | None
    """The pathology this finding is evidence of, if any."""
    layer: str | None
    """The layer it is about, or None for the whole model."""
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    """The measured numbers behind the message."""


@dataclass(frozen=True)
class Recommendation:
    """A fix that addresses a finding's likely cause, with evidence and a snippet."""

    id: str
    """Stable id from DESIGN.md §3 (``kaiming_init``, ``residual``...)."""
    title: str
    why: str
    """The measured evidence that makes this fix fit."""
    snippet: str
    """Copy-paste code that applies the fix."""
    addresses: tuple[Problem, ...] = ()
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PathSummary:
    """How the activation gradient changes from the output end to the input end."""

    measured_with: str
    """``activation_gradients`` (module hooks), ``bias_gradients`` (TorchScript: ‖∂L/∂b‖ per layer),
    ``parameter_gradients`` (a training history without activation hooks) or ``not_measured`` (nothing measured
    sees the path; the report's ``status`` is then ``not_measured`` unless problems were found)."""
    length: int
    """Number of forward calls on the path."""
    attenuation: float | None
    """Gradient at the input end divided by the gradient at the output end."""
    gain: float | None
    """Geometric-mean factor per layer (the ``simulate --factor`` of this model)."""
    first_layer: str | None = None
    last_layer: str | None = None
    output_ends: tuple[str, ...] = ()
    """The layers nearest the loss (along the autograd graph) whose pooled gradient √Σ‖∂L/∂h‖² is the output
    end the path is measured against, largest first; empty where the path follows forward order."""


@dataclass(frozen=True)
class RunInfo:
    """What was measured: the model, the batch, the loss and the mode."""

    source: str
    """Checkpoint path or ``example:NAME`` or ``python object``."""
    checkpoint_kind: str
    """``pickled_module``, ``state_dict``, ``training_checkpoint``, ``torchscript``, ``exported_program``,
    ``safetensors``, ``huggingface``, ``dcp``, ``example``, ``module``..., or ``training_history`` for
    ``gradcheck history``."""
    model_type: str
    parameters: int
    mode: str
    """``train`` or ``eval``."""
    seed: int
    batch: str
    """Human description of the batch (shapes and dtypes)."""
    batch_source: str
    """Where the batch came from: ``--input FILE``, ``--input-shape``, the checkpoint's example inputs, inferred."""
    loss: str
    """Human description of the loss that was differentiated."""
    loss_kind: str
    """``model``, ``cross_entropy``, ``mse`` or ``random_projection``."""
    loss_value: float
    device: str = "cpu"
    """Where the probe ran; ``""`` for a training history (the training loop chose)."""
    gradcheck_version: str = ""
    torch_version: str = ""


@dataclass(frozen=True)
class LayerMove:
    """A layer whose gradient moved against the baseline by more than the tolerance."""

    layer: str
    before: float
    after: float

    def as_dict(self) -> dict[str, Any]:
        """The move as a JSON object (``layer``, ``before``, ``after``, ``orders``)."""
        return {"layer": self.layer, "before": self.before, "after": self.after, "orders": self.orders}

    @property
    def orders(self) -> float:
        """log10(after / before): negative when the gradient shrank."""
        if self.before <= 0 or self.after <= 0:
            return -math.inf if self.after < self.before else math.inf
        return math.log10(self.after / self.before)


@dataclass(frozen=True)
class BaselineDiff:
    """What changed against a stored baseline report (``--baseline``)."""

    baseline: str
    """Path of the baseline file."""
    tolerance: float
    """Allowed change of a layer's gradient, in orders of magnitude."""
    new_findings: tuple[Finding, ...] = ()
    """Findings not in the baseline (matched by code and layer): these fail the gate."""
    fixed_findings: tuple[Finding, ...] = ()
    """Baseline findings that are gone: improvements."""
    worse_layers: tuple[LayerMove, ...] = ()
    """Layers whose activation gradient moved away from the output's by more than the tolerance."""
    better_layers: tuple[LayerMove, ...] = ()
    """Layers whose gradient moved towards the output's by more than the tolerance."""

    @property
    def regressed(self) -> bool:
        """Whether anything got worse: new findings or layers beyond the tolerance."""
        return bool(self.new_findings or self.worse_layers)


@dataclass(frozen=True)
class Report:
    """Everything one ``inspect`` run found. Frozen: renderers only read it."""

    run: RunInfo
    layers: tuple[LayerStats, ...]
    path: PathSummary
    findings: tuple[Finding, ...]
    recommendations: tuple[Recommendation, ...]
    notes: tuple[str, ...] = ()
    """Caveats about what could not be measured, in plain words."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """The thresholds the rules used (``vanishing_attenuation``, ``exploding_attenuation``)."""
    baseline: BaselineDiff | None = None
    """Set with ``--baseline``: the gate then fails only on regressions; None without one."""
    init_audit: InitAudit | None = None
    """Each Linear/Conv/RNN weight's scale against Xavier/Kaiming for the activation after it
    (docs/init_audit.md); None for TorchScript/export programs."""
    activations: tuple[ActivationLayer, ...] = ()
    """Per activation module, measured on the same pass: saturated and dead shares and the RMS of φ'(z)
    (docs/diagnostics.md)."""
    precision: Precision | None = None
    """What fp16/bf16 would lose of the gradients (docs/diagnostics.md)."""
    non_finite_origin: NonFiniteOrigin | None = None
    """Where NaN/Inf first appeared, in forward and backward order; None when nothing was non-finite."""
    verifications: tuple[Verification, ...] = ()
    """Recommendations applied to a copy of the model and re-probed, in the order of ``recommendations``."""
    optimisation: OptimisationTrace | None = None
    """``--steps N``: gradients across N optimiser steps on the sample batch, on a copy."""
    history: TrainingHistory | None = None
    """``gradcheck history``: the training run that ``watch()`` recorded (None for ``inspect``). The report's
    ``layers`` and ``path`` are those of the record where the first problem began (the last record when
    healthy); ``run.checkpoint_kind`` is ``training_history``, ``run.device`` is ``""``."""
    timing: dict[str, float] = field(default_factory=dict)
    """``--profile``: seconds per phase (startup, import, load, probe, diagnose, verify, locate_non_finite,
    optimise); empty otherwise, and then null in JSON."""

    @property
    def problems(self) -> tuple[Problem, ...]:
        """The distinct problems of error severity, in a fixed order; empty when healthy."""
        found = {f.problem for f in self.findings if f.severity is Severity.ERROR and f.problem}
        return tuple(p for p in Problem if p in found)

    @property
    def measured(self) -> bool:
        """False when nothing measured could see the gradient path (``path.measured_with`` ``not_measured``)."""
        return self.path.measured_with != NOT_MEASURED

    @property
    def healthy(self) -> bool:
        """True when no problem was found and the gradient path was measured."""
        return not self.problems and self.measured

    @property
    def status(self) -> str:
        """``healthy``; ``unhealthy`` when problems were found; ``not_measured`` when none was found but the
        gradient path could not be measured (no verdict of health)."""
        if self.problems:
            return "unhealthy"
        return "healthy" if self.measured else NOT_MEASURED

    def __str__(self) -> str:
        """The text report, as ``gradcheck inspect`` prints it to a file (no colour): ``print(report)``."""
        from gradcheck_cli.report.display import shown

        return shown("text", self) or repr(self)

    def _repr_html_(self) -> str | None:
        """Jupyter's display: the verdict, the gradient chart, the findings and the recommendations as one
        self-contained HTML fragment (inline CSS and SVG)."""
        from gradcheck_cli.report.display import shown

        return shown("html", self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of DESIGN.md §3 (plus additive keys), with finite numbers or null."""
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            entry["act_grad_norms"] = list(layer.act_grad_norms)
            entry["flags"] = list(layer.flags)
            entry["time_grad_norms"] = list(layer.time_grad_norms)
            entry["grad_weight_ratio"] = layer.grad_weight_ratio
            layers.append(entry)
        safe: dict[str, Any] = json_safe(
            {
                "schema_version": SCHEMA_VERSION,
                "status": self.status,
                "problems": [p.value for p in self.problems],
                "layers": layers,
                "findings": [_finding_dict(f) for f in self.findings],
                "recommendations": [
                    {
                        "id": r.id,
                        "title": r.title,
                        "why": r.why,
                        "snippet": r.snippet,
                        "addresses": [p.value for p in r.addresses],
                        "layers": list(r.layers),
                    }
                    for r in self.recommendations
                ],
                "path": asdict(self.path),
                "run": asdict(self.run),
                "notes": list(self.notes),
                "thresholds": dict(self.thresholds),
                "baseline": None if self.baseline is None else _baseline_dict(self.baseline),
                "init_audit": None if self.init_audit is None else asdict(self.init_audit),
                "activations": [asdict(a) for a in self.activations],
                "precision": None if self.precision is None else asdict(self.precision),
                "non_finite_origin": None if self.non_finite_origin is None else asdict(self.non_finite_origin),
                "verifications": [asdict(v) for v in self.verifications],
                "optimisation": None if self.optimisation is None else asdict(self.optimisation),
                "history": None if self.history is None else asdict(self.history),
                "timing": dict(self.timing) or None,
            }
        )
        return safe


def _finding_dict(f: Finding) -> dict[str, Any]:
    return {
        "code": f.code,
        "name": f.name,
        "severity": f.severity.value,
        "problem": f.problem.value if f.problem else None,
        "layer": f.layer,
        "message": f.message,
        "evidence": f.evidence,
    }


def _baseline_dict(diff: BaselineDiff) -> dict[str, Any]:
    return {
        "file": diff.baseline,
        "tolerance_orders": diff.tolerance,
        "regressed": diff.regressed,
        "new_findings": [_finding_dict(f) for f in diff.new_findings],
        "fixed_findings": [_finding_dict(f) for f in diff.fixed_findings],
        "worse_layers": [m.as_dict() for m in diff.worse_layers],
        "better_layers": [m.as_dict() for m in diff.better_layers],
    }


def json_safe(value: Any) -> Any:
    """Replace NaN and ±Inf (not valid JSON) by the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
