"""The public library entry point: ``check(model, batch) -> Report``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec

import torch
from torch import nn

from gradcheck_cli.advise.advice import advise
from gradcheck_cli.advise.optimise import optimisation_findings, trace_optimisation
from gradcheck_cli.advise.trained import trained_weights
from gradcheck_cli.advise.verify import order_by_effect, verify_recommendations
from gradcheck_cli.diagnose.activation_health import activation_findings, activation_section
from gradcheck_cli.diagnose.init_audit import audit_init, init_findings
from gradcheck_cli.diagnose.precision import precision_findings, precision_section
from gradcheck_cli.diagnose.program_signal import BIAS_GRADIENTS
from gradcheck_cli.diagnose.rule_codes import FP16_OVERFLOW, FP16_UNDERFLOW
from gradcheck_cli.diagnose.rules import Diagnosis, diagnose
from gradcheck_cli.diagnose.traits import model_traits
from gradcheck_cli.distributed.reduce import Sharding, sharded
from gradcheck_cli.distributed.reduce import detect as detect_sharding
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.batch import Batch, make_batch
from gradcheck_cli.load.model_copy import copy_model
from gradcheck_cli.probe.measure import (
    AUTOCAST_DTYPES,
    autocast_device,
    kept_buffers,
    probe,
    probe_scaled,
    untouched_tensors,
)
from gradcheck_cli.probe.modules import module_type, unwrap
from gradcheck_cli.probe.nonfinite import locate_non_finite
from gradcheck_cli.probe.norms import HALF
from gradcheck_cli.probe.precision import ZERO_BIN, recommended_scale
from gradcheck_cli.probe.results import LayerMeasure, ProbeResult
from gradcheck_cli.report.report import Finding, Problem, Recommendation, Report, RunInfo
from gradcheck_cli.report.sections import ActivationLayer, InitAudit, Precision
from gradcheck_cli.settings import Autocast, CheckOptions, ProbeSettings, Provenance, check_settings
from gradcheck_cli.timing import phase
from gradcheck_cli.version import __version__

if TYPE_CHECKING:
    from typing_extensions import Unpack

P = ParamSpec("P")


def _leaving_user_state(run: Callable[P, Report]) -> Callable[P, Report]:
    """Leave every buffer of the model (the first argument) as it was found, whatever ``run`` reads, and the
    batch's tensors (the second) and the model's plain tensor attributes without a new ``.grad`` or hook dict."""

    @functools.wraps(run)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Report:
        model = args[0] if args else kwargs["model"]
        batch = args[1] if len(args) > 1 else kwargs.get("batch")
        assert isinstance(model, nn.Module)
        with kept_buffers(unwrap(model)), untouched_tensors(unwrap(model), batch):
            return run(*args, **kwargs)

    return wrapper


@_leaving_user_state
def check(
    model: nn.Module,
    batch: Batch | torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any],
    settings: ProbeSettings | None = None,
    provenance: Provenance | None = None,
    **options: Unpack[CheckOptions],
) -> Report:
    """Probe ``model`` on ``batch`` once, diagnose the gradients and return the frozen report.

    ``batch`` is what a batch file would hold (a tensor, ``(inputs..., target)``, a dict of
    keyword tensors) or a ready :class:`Batch`. ``settings`` says what to probe and how
    (:class:`~gradcheck_cli.settings.ProbeSettings`), ``provenance`` where the model and batch came from
    (:class:`~gradcheck_cli.settings.Provenance`: its ``notes`` are carried into the report, its ``trained``
    reason skips the initialisation audit). Any field of either may be given as a keyword instead, which
    replaces it: ``check(model, batch, verify=False)``, ``check(model, batch, steps=5, lr=0.1)``; a keyword
    that names no field is a ``TypeError``.

    A model whose parameters are all frozen is refused (:class:`~gradcheck_cli.errors.BatchError`) unless
    ``unfreeze``. The model is left as it was found: its modes, ``requires_grad`` flags and ``.grad``
    values are restored and no hook remains.

    Beyond the one probe: ``verify`` applies each recommendation to a copy of the model and
    probes the copy on the same batch (the list is then ordered by the verified effect);
    ``autocast`` (``"fp16"``/``"bf16"``) probes under ``torch.autocast`` (fp16 with a
    GradScaler-style loss scale) beside a float32 reference and forecasts what half precision loses (the
    ``precision`` section, GC013/GC014: measured only for a model held in fp16/bf16 or under ``autocast``,
    it costs a pass over every gradient); ``steps`` > 0 runs that many
    ``optimizer`` steps at ``lr`` on a copy (the optimisation probe).
    """
    return _check(model, batch, *check_settings(settings, provenance, options, "check"))


def _check(
    model: nn.Module,
    batch: Batch | torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any],
    settings: ProbeSettings,
    provenance: Provenance,
) -> Report:
    """:func:`check` with its settings resolved: probe, judge, locate NaN, optimise, advise, verify."""
    sharding = detect_sharding(model)
    wrapper, model = model, unwrap(model)
    ready = batch if isinstance(batch, Batch) else make_batch(batch, model)
    if sharding is not None and (settings.autocast is not None or settings.steps):
        raise GradcheckError("--autocast and --steps do not run on a distributed model yet; drop them")
    with phase("probe"):
        if sharding is not None:
            result, reference = _probe_sharded(wrapper, ready, sharding, settings), None
        else:
            result, reference = _measure(model, ready, settings)
    with phase("diagnose"):
        judged = _judge(model, result, reference, sharding, settings, provenance.trained)
    findings = judged.findings
    origin = None
    if sharding is None and _non_finite(findings):
        with phase("locate_non_finite"):
            origin = locate_non_finite(
                model, ready, **settings.pass_options(), autocast=settings.autocast_name, loss_scale=result.loss_scale,
            )  # fmt: skip
    trace = None
    if settings.steps:
        with phase("optimise"):
            trace = trace_optimisation(model, ready, settings)
        if not (trace.verdict == "non_finite" and trace.onset_step == 0):  # NaN before any step: GC003/GC004's
            findings += optimisation_findings(trace)
    with phase("diagnose"):
        recommendations = _advise(model, judged, findings, provenance.trained)
    device = autocast_device(list(model.parameters())) if settings.autocast is not None else None
    notes = _notes(provenance, sharding, judged, result, settings, device)
    report = dataclasses.replace(
        _report(model, ready, result, judged.diagnosis, findings, recommendations, notes, settings, provenance),
        init_audit=judged.audit,
        activations=judged.activations,
        precision=judged.precision,
        non_finite_origin=origin,
        optimisation=trace,
    )
    if not (settings.verify and sharding is None and recommendations):
        return report
    with phase("verify"):
        verifications = verify_recommendations(model, ready, report, settings, loss_scale=result.loss_scale)
    ordered, verifications = order_by_effect(recommendations, verifications)
    return dataclasses.replace(report, recommendations=ordered, verifications=verifications)


@dataclass(frozen=True)
class _Judged:
    """One probe judged: the rules' diagnosis, the sections beside it, and every finding in report order."""

    diagnosis: Diagnosis
    activations: tuple[ActivationLayer, ...]
    precision: Precision | None
    """The half-precision forecast; None for a float32 model probed without ``autocast``."""
    audit: InitAudit | None
    findings: tuple[Finding, ...]
    """What is wrong, then why: the rules', the init audit's, the activations', the precision's."""
    half: bool
    """The model trains in fp16 (fp16 parameters or fp16 autocast)."""


def _judge(
    model: nn.Module,
    result: ProbeResult,
    reference: ProbeResult | None,
    sharding: Sharding | None,
    settings: ProbeSettings,
    trained: str | None,
) -> _Judged:
    """The rules over ``result``; the float32 ``reference`` (if any) is the truth half precision is judged by."""
    diagnosis = diagnose(result, settings.thresholds)
    activations = activation_section(result.activations)
    truth = reference or result
    precision = None
    if truth.precision:  # measured where half precision is in use or asked about (_measure)
        precision = precision_section(
            [m.name for m in result.layers],
            truth.precision,
            [_peak(m) for m in truth.layers],
            autocast=settings.autocast_name,
            scale_used=result.loss_scale,
            lost=_lost(reference, result) if reference is not None else (),
        )
    auditable = result.activation_hooks and (sharding is None or sharding.mode == "ddp")
    audit = audit_init(model, result.leaf_calls, trained=trained) if auditable else None
    half = settings.autocast is Autocast.fp16 or any(p.dtype == torch.float16 for p in model.parameters())
    findings = list(diagnosis.findings)
    if audit is not None:
        findings += init_findings(audit)
    findings += activation_findings(activations)
    if precision is not None and not _non_finite(findings):  # NaN/Inf already: fp16 is not the story
        findings += precision_findings(precision, half=half)
    return _Judged(diagnosis, activations, precision, audit, tuple(findings), half)


def _non_finite(findings: Sequence[Finding]) -> bool:
    return any(f.problem is Problem.NON_FINITE for f in findings)


def _advise(
    model: nn.Module, judged: _Judged, findings: tuple[Finding, ...], trained: str | None
) -> tuple[Recommendation, ...]:
    """The recommendations, when a finding names a problem or a cause that has a fix."""
    if not any(f.problem is not None or f.code in CAUSE_CODES for f in findings):
        return ()
    return advise(
        findings,
        judged.diagnosis.layers,
        judged.diagnosis.path,
        model_traits(model, {} if judged.audit is None else {layer.layer: layer.std for layer in judged.audit.layers}),
        activations=judged.activations,
        precision=judged.precision,
        half=judged.half,
        trained=trained_weights(model, judged.audit, trained),
    )


def _notes(
    provenance: Provenance,
    sharding: Sharding | None,
    judged: _Judged,
    result: ProbeResult,
    settings: ProbeSettings,
    device: str | None,
) -> list[str]:
    """The loader's notes, then what this run did that the numbers alone do not say (``device``: the type the
    parameters are on, where autocast ran; None without autocast)."""
    notes = list(provenance.notes)
    if sharding is not None:
        notes.append(
            f"distributed ({sharding.mode}, {sharding.world} ranks): each rank probed its 1/{sharding.world} of the "
            "batch; norms are reduced across ranks to those of the whole batch (docs/distributed.md); the "
            "recommendations are not verified and the first NaN/Inf is not located here: run gradcheck on one "
            "process for those"
            + ("; the init audit needs unsharded weights and was skipped" if sharding.mode == "fsdp" else "")
        )
    layers = judged.diagnosis.layers
    frozen = [layer.name for layer in layers if layer.frozen]
    if frozen:
        everything = "all parameters" if len(frozen) == len(layers) else f"{len(frozen)} frozen layer(s)"
        notes.append(
            f"{everything} had requires_grad=False; gradcheck enabled gradients for this probe only, so the flow "
            "through them is measured too (flags restored afterwards)"
        )
    if not result.activation_hooks and judged.diagnosis.path.measured_with == BIAS_GRADIENTS:
        notes.append(
            "module hooks do not fire on TorchScript modules: the path is read through the layers' bias gradients "
            "(the output gradient summed over the batch)"
        )
    if settings.autocast is not None:
        scaled = f" with the loss scaled by {result.loss_scale:g}; gradients are reported unscaled"
        how = f"probed under torch.autocast({AUTOCAST_DTYPES[settings.autocast.value]})"
        if settings.autocast.value == "fp16" and device == "cpu":
            how = (
                "probed under CUDA's fp16 autocast emulated on the CPU (float32 kernels, fp16 values and gradients "
                "where CUDA holds fp16; the CPU's own fp16 kernels are 7-11× slower)"
            )
        notes.append(how + (scaled if judged.half else "") + "; a float32 pass is the reference for what half "
                     "precision loses")  # fmt: skip
    return notes


def _probe_sharded(wrapper: nn.Module, batch: Batch, sharding: Sharding, settings: ProbeSettings) -> ProbeResult:
    """The probe through the DDP/FSDP2 wrapper (so backward reduces the gradients), every number reduced across
    ranks, layers named as in the unwrapped module; the half-precision forecast for a model held in fp16/bf16."""
    with sharded(sharding):
        result = probe(wrapper, batch, **settings.pass_options(), precision=_held_in_half(wrapper))
    if wrapper is unwrap(wrapper):
        return result
    prefix = _wrapper_prefix(wrapper)

    def strip(name: str) -> str:
        return name[len(prefix) :] if prefix and name.startswith(prefix) else name

    layers = tuple(dataclasses.replace(m, name=strip(m.name)) for m in result.layers)
    leaf_calls = tuple((strip(name), kind) for name, kind in result.leaf_calls)
    activations = tuple(dataclasses.replace(a, name=strip(a.name)) for a in result.activations)
    return dataclasses.replace(result, layers=layers, leaf_calls=leaf_calls, activations=activations)


def _wrapper_prefix(wrapper: nn.Module) -> str:
    """``module.`` (DDP), ``_orig_mod.`` (compile) ... up to the unwrapped module's own names."""
    inner = unwrap(wrapper)
    for name, module in wrapper.named_modules():
        if module is inner:
            return f"{name}." if name else ""
    return ""


def _measure(model: nn.Module, batch: Batch, settings: ProbeSettings) -> tuple[ProbeResult, ProbeResult | None]:
    """The probe the report reads, and a float32 reference where half precision is involved.

    Under ``autocast`` the float32 pass comes first (it sets the loss scale for fp16); for a model that
    holds fp16/bf16 parameters, a float32 copy is probed as well. The half-precision forecast (the probe's
    ``precision`` histograms) is measured only then: where half precision is in use or asked about.
    """
    held_in_half = _held_in_half(model)
    forecast = held_in_half or settings.autocast is not None
    result = probe(model, batch, **settings.pass_options(), precision=forecast)
    # a model held in half precision has already rounded its small gradients away: a float32 copy is the truth
    reference = _float32_reference(model, batch, settings) if held_in_half else None
    if settings.autocast is not None:
        truth = reference or result
        scale = recommended_scale(truth.precision) if settings.autocast is Autocast.fp16 else 1.0
        half = probe_scaled(
            model, batch, **settings.pass_options(), autocast=settings.autocast_name, loss_scale=scale, precision=True
        )
        return half, truth
    return result, reference


def _held_in_half(model: nn.Module) -> bool:
    """Whether the model holds fp16/bf16 parameters (then its half-precision forecast is measured)."""
    return any(p.dtype in HALF for p in model.parameters())


CAUSE_CODES = frozenset({FP16_UNDERFLOW.code, FP16_OVERFLOW.code})
"""Findings without a problem of their own whose cause still has a fix to recommend."""


def _report(
    model: nn.Module,
    batch: Batch,
    result: ProbeResult,
    diagnosis: Diagnosis,
    findings: tuple[Finding, ...],
    recommendations: tuple[Recommendation, ...],
    notes: list[str],
    settings: ProbeSettings,
    provenance: Provenance,
) -> Report:
    """The report of one probe, before its sections (init audit, activations, precision...) are added."""
    device = next((str(p.device) for p in model.parameters()), "cpu")
    run = RunInfo(
        source=provenance.source,
        checkpoint_kind=provenance.checkpoint_kind,
        model_type=module_type(model),
        parameters=sum(p.numel() for p in model.parameters()),
        mode=result.mode,
        seed=settings.seed,
        batch=batch.describe(),
        batch_source=provenance.batch_source,
        loss=result.loss.description,
        loss_kind=result.loss.kind,
        loss_value=result.loss_value,
        device=device,
        gradcheck_version=__version__,
        torch_version=torch.__version__,
    )
    return Report(
        run=run,
        layers=diagnosis.layers,
        path=diagnosis.path,
        findings=findings,
        recommendations=recommendations,
        notes=tuple(notes),
        thresholds=settings.thresholds.as_dict(),
    )


def _float32_reference(model: nn.Module, batch: Batch, settings: ProbeSettings) -> ProbeResult | None:
    """The same probe on a float32 copy of a half-precision model: what its gradients would be unrounded."""
    try:
        copy = copy_model(model).float()
    except Exception:  # a model that cannot be copied simply gets no reference
        return None
    floats = Batch(
        args=tuple(_to_float32(a) for a in batch.args),
        kwargs={k: _to_float32(v) for k, v in batch.kwargs.items()},
        target=batch.target,
    )
    try:
        return probe(copy, floats, **settings.pass_options(), precision=True)
    except GradcheckError:
        return None


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _peak(measure: LayerMeasure) -> float:
    """The largest |gradient element| of a layer, over its parameters and its output calls."""
    peaks = [n.max_abs for n in (measure.grad, *measure.calls) if n is not None and n.max_abs is not None]
    return max(peaks, default=0.0)  # every maximum is measured where the forecast runs (probe's ``precision``)


def _lost(reference: ProbeResult, half: ProbeResult) -> tuple[tuple[str, float], ...]:
    """Per layer: the share of gradient elements that are 0 in half precision but not in float32."""
    lost = []
    for measure, ref_hist, half_hist in zip(half.layers, reference.precision, half.precision, strict=True):
        ref_total, half_total = sum(ref_hist), sum(half_hist)
        if not ref_total or not half_total:
            continue
        share = half_hist[ZERO_BIN] / half_total - ref_hist[ZERO_BIN] / ref_total
        if share > 0:
            lost.append((measure.name, share))
    return tuple(lost)
