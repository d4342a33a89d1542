"""The public library entry point: ``check(model, batch) -> Report``."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ParamSpec

import torch
from torch import nn

from gradcheck_cli.advise.advice import advise
from gradcheck_cli.advise.optimise import optimisation_findings, trace_optimisation
from gradcheck_cli.advise.verify import order_by_effect, verify_recommendations
from gradcheck_cli.diagnose.activation_health import activation_findings, activation_section
from gradcheck_cli.diagnose.init_audit import audit_init, init_findings
from gradcheck_cli.diagnose.rule_codes import FP16_OVERFLOW, FP16_UNDERFLOW
from gradcheck_cli.diagnose.rules import Diagnosis, Thresholds, diagnose
from gradcheck_cli.diagnose.traits import model_traits
from gradcheck_cli.distributed.reduce import Sharding, sharded
from gradcheck_cli.distributed.reduce import detect as detect_sharding
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.batch import Batch, make_batch
from gradcheck_cli.load.model_copy import copy_model
from gradcheck_cli.probe.measure import AUTOCAST_DTYPES, kept_buffers, probe, probe_scaled, untouched_tensors
from gradcheck_cli.probe.modules import module_type, unwrap
from gradcheck_cli.probe.nonfinite import locate_non_finite
from gradcheck_cli.probe.precision import ZERO_BIN, precision_findings, precision_section, recommended_scale
from gradcheck_cli.probe.results import LayerMeasure, ProbeResult
from gradcheck_cli.report.report import Finding, Problem, Recommendation, Report, RunInfo
from gradcheck_cli.timing import phase
from gradcheck_cli.version import __version__

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
    *,
    seed: int = 0,
    train: bool = True,
    unfreeze: bool = False,
    thresholds: Thresholds | None = None,
    verify: bool = True,
    autocast: str | None = None,
    steps: int = 0,
    lr: float = 1e-3,
    optimizer: str = "sgd",
    trained: str | None = None,
    source: str = "python object",
    checkpoint_kind: str = "module",
    notes: tuple[str, ...] = (),
    batch_source: str = "passed to check()",
) -> Report:
    """Probe ``model`` on ``batch`` once, diagnose the gradients and return the frozen report.

    ``batch`` is what a batch file would hold (a tensor, ``(inputs..., target)``, a dict of
    keyword tensors) or a ready :class:`Batch`. A model whose parameters are all frozen is
    refused (:class:`~gradcheck_cli.errors.BatchError`) unless ``unfreeze``. ``notes`` (what the loader had to do) are
    carried into the report. The model is left as it was found: its modes,
    ``requires_grad`` flags and ``.grad`` values are restored and no hook remains.

    Beyond the one probe: ``verify`` applies each recommendation to a copy of the model and
    probes the copy on the same batch (the list is then ordered by the verified effect);
    ``autocast`` (``"fp16"``/``"bf16"``) probes under ``torch.autocast`` (fp16 with a
    GradScaler-style loss scale) beside a float32 reference; ``steps`` > 0 runs that many
    ``optimizer`` steps at ``lr`` on a copy (the optimisation probe); ``trained`` (a reason,
    e.g. the checkpoint held optimizer state) skips the initialisation audit.
    """
    sharding = detect_sharding(model)
    wrapper, model = model, unwrap(model)
    ready = batch if isinstance(batch, Batch) else make_batch(batch, model)
    limits = thresholds or Thresholds()
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise GradcheckError(f"autocast {autocast!r} is not a half precision; use fp16 or bf16")
    if sharding is not None and (autocast is not None or steps):
        raise GradcheckError("--autocast and --steps do not run on a distributed model yet; drop them")
    with phase("probe"):
        if sharding is not None:
            result = _probe_sharded(wrapper, ready, sharding, seed=seed, train=train, unfreeze=unfreeze)
            reference = None
        else:
            result, reference = _measure(model, ready, seed=seed, train=train, unfreeze=unfreeze, autocast=autocast)
    with phase("diagnose"):
        traits = model_traits(model)
        diagnosis = diagnose(result, limits)
        activations = activation_section(result.activations)
        precision = precision_section(
            [m.name for m in result.layers],
            (reference or result).precision,
            [_peak(m) for m in (reference or result).layers],
            autocast=autocast,
            scale_used=result.loss_scale,
            lost=_lost(reference, result) if reference is not None else (),
        )
        auditable = result.activation_hooks and (sharding is None or sharding.mode == "ddp")
        audit = audit_init(model, result.leaf_calls, trained=trained) if auditable else None
        half = autocast == "fp16" or any(p.dtype == torch.float16 for p in model.parameters())
        findings = list(diagnosis.findings)  # what is wrong, then why: init, activations, precision
        if audit is not None:
            findings += init_findings(audit)
        findings += activation_findings(activations)
        if not any(f.problem is Problem.NON_FINITE for f in findings):  # NaN/Inf already: fp16 is not the story
            findings += precision_findings(precision, half=half)
    origin = None
    if sharding is None and any(f.problem is Problem.NON_FINITE for f in findings):
        with phase("locate_non_finite"):
            origin = locate_non_finite(
                model, ready, seed=seed, train=train, unfreeze=unfreeze, autocast=autocast,
                loss_scale=result.loss_scale,
            )  # fmt: skip
    trace = None
    if steps:
        with phase("optimise"):
            trace = trace_optimisation(
                model, ready, steps=steps, lr=lr, optimizer=optimizer, seed=seed, train=train, unfreeze=unfreeze,
                thresholds=limits,
            )  # fmt: skip
        if not (trace.verdict == "non_finite" and trace.onset_step == 0):  # NaN before any step: GC003/GC004's
            findings += optimisation_findings(trace)

    advised = any(f.problem is not None or f.code in CAUSE_CODES for f in findings)
    with phase("diagnose"):
        recommendations = (
            advise(
                findings,
                diagnosis.layers,
                diagnosis.path,
                traits,
                activations=activations,
                precision=precision,
                half=half,
            )
            if advised
            else ()
        )
    all_notes = list(notes)
    if sharding is not None:
        all_notes.append(
            f"distributed ({sharding.mode}, {sharding.world} ranks): each rank probed its 1/{sharding.world} of the "
            "batch; norms are reduced across ranks to those of the whole batch (docs/distributed.md); the "
            "recommendations are not verified and the first NaN/Inf is not located here: run gradcheck on one "
            "process for those"
            + ("; the init audit needs unsharded weights and was skipped" if sharding.mode == "fsdp" else "")
        )
        verify = False
    frozen = [layer.name for layer in diagnosis.layers if layer.frozen]
    if frozen:
        everything = "all parameters" if len(frozen) == len(diagnosis.layers) else f"{len(frozen)} frozen layer(s)"
        all_notes.append(
            f"{everything} had requires_grad=False; gradcheck enabled gradients for this probe only, so the flow "
            "through them is measured too (flags restored afterwards)"
        )
    if not result.activation_hooks:
        all_notes.append(
            "module hooks do not fire on TorchScript modules or torch.export programs: "
            "only parameter gradients were measured"
        )
    if autocast is not None:
        all_notes.append(
            f"probed under torch.autocast({AUTOCAST_DTYPES[autocast]})"
            + (f" with the loss scaled by {result.loss_scale:g}; gradients are reported unscaled" if half else "")
            + "; a float32 pass is the reference for what half precision loses"
        )
    report = dataclasses.replace(
        _report(
            model, ready, result, diagnosis, findings, recommendations, all_notes, limits, seed, source,
            checkpoint_kind, batch_source,
        ),
        init_audit=audit,
        activations=activations,
        precision=precision,
        non_finite_origin=origin,
        optimisation=trace,
    )  # fmt: skip
    if not (verify and recommendations):
        return report
    with phase("verify"):
        verifications = verify_recommendations(
            model, ready, report, seed=seed, train=train, unfreeze=unfreeze, thresholds=limits, autocast=autocast,
            loss_scale=result.loss_scale,
        )  # fmt: skip
    ordered, verifications = order_by_effect(recommendations, verifications)
    return dataclasses.replace(report, recommendations=ordered, verifications=verifications)


def _probe_sharded(
    wrapper: nn.Module, batch: Batch, sharding: Sharding, *, seed: int, train: bool, unfreeze: bool
) -> ProbeResult:
    """The probe through the DDP/FSDP2 wrapper (so backward reduces the gradients), every number reduced across
    ranks, layers named as in the unwrapped module."""
    with sharded(sharding):
        result = probe(wrapper, batch, seed=seed, train=train, unfreeze=unfreeze)
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


def _measure(
    model: nn.Module, batch: Batch, *, seed: int, train: bool, unfreeze: bool, autocast: str | None
) -> tuple[ProbeResult, ProbeResult | None]:
    """The probe the report reads, and a float32 reference where half precision is involved.

    Under ``autocast`` the float32 pass comes first (it sets the loss scale for fp16); for a model that
    holds fp16/bf16 parameters, a float32 copy is probed as well.
    """
    result = probe(model, batch, seed=seed, train=train, unfreeze=unfreeze)
    held_in_half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    # a model held in half precision has already rounded its small gradients away: a float32 copy is the truth
    reference = _float32_reference(model, batch, seed=seed, train=train, unfreeze=unfreeze) if held_in_half else None
    if autocast is not None:
        truth = reference or result
        scale = recommended_scale(truth.precision) if autocast == "fp16" else 1.0
        half = probe_scaled(
            model, batch, seed=seed, train=train, unfreeze=unfreeze, autocast=autocast, loss_scale=scale
        )
        return half, truth
    return result, reference


CAUSE_CODES = frozenset({FP16_UNDERFLOW.code, FP16_OVERFLOW.code})
"""Findings without a problem of their own whose cause still has a fix to recommend."""


def _report(
    model: nn.Module,
    batch: Batch,
    result: ProbeResult,
    diagnosis: Diagnosis,
    findings: list[Finding],
    recommendations: tuple[Recommendation, ...],
    notes: list[str],
    limits: Thresholds,
    seed: int,
    source: str,
    checkpoint_kind: str,
    batch_source: str,
) -> Report:
    device = next((str(p.device) for p in model.parameters()), "cpu")
    run = RunInfo(
        source=source,
        checkpoint_kind=checkpoint_kind,
        model_type=module_type(model),
        parameters=sum(p.numel() for p in model.parameters()),
        mode=result.mode,
        seed=seed,
        batch=batch.describe(),
        batch_source=batch_source,
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
        findings=tuple(findings),
        recommendations=recommendations,
        notes=tuple(notes),
        thresholds=limits.as_dict(),
    )


def _float32_reference(model: nn.Module, batch: Batch, *, seed: int, train: bool, unfreeze: bool) -> ProbeResult | None:
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
        return probe(copy, floats, seed=seed, train=train, unfreeze=unfreeze)
    except GradcheckError:
        return None


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _peak(measure: LayerMeasure) -> float:
    """The largest |gradient element| of a layer, over its parameters and its output calls."""
    peaks = [n.max_abs for n in (measure.grad, *measure.calls) if n is not None]
    return max(peaks, default=0.0)


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
