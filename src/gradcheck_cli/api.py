"""The public library entry point: ``check(model, batch) -> Report``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradcheck_cli import __version__
from gradcheck_cli.advice import advise
from gradcheck_cli.batch import Batch, make_batch
from gradcheck_cli.probe import module_type, probe
from gradcheck_cli.report import Report, RunInfo
from gradcheck_cli.rules import Thresholds, diagnose
from gradcheck_cli.traits import model_traits


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module inside DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def check(
    model: nn.Module,
    batch: Batch | torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any],
    *,
    seed: int = 0,
    train: bool = True,
    unfreeze: bool = False,
    thresholds: Thresholds | None = None,
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
    """
    model = unwrap(model)
    ready = batch if isinstance(batch, Batch) else make_batch(batch, model)
    limits = thresholds or Thresholds()
    result = probe(model, ready, seed=seed, train=train, unfreeze=unfreeze)
    diagnosis = diagnose(result, limits)
    has_problem = any(f.problem is not None for f in diagnosis.findings)
    recommendations = (
        advise(diagnosis.findings, diagnosis.layers, diagnosis.path, model_traits(model)) if has_problem else ()
    )
    all_notes = list(notes)
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
    device = next((str(p.device) for p in model.parameters()), "cpu")
    run = RunInfo(
        source=source,
        checkpoint_kind=checkpoint_kind,
        model_type=module_type(model),
        parameters=sum(p.numel() for p in model.parameters()),
        mode=result.mode,
        seed=seed,
        batch=ready.describe(),
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
        findings=diagnosis.findings,
        recommendations=recommendations,
        notes=tuple(all_notes),
        thresholds=limits.as_dict(),
    )
