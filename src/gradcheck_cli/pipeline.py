"""The inspect pipeline for files and examples: load → batch → check (probe, diagnose, advise)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradcheck_cli.api import check
from gradcheck_cli.batch import load_batch_file, make_batch
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.examples import get_example
from gradcheck_cli.load import load_checkpoint
from gradcheck_cli.report import Report
from gradcheck_cli.rules import Thresholds


@dataclass(frozen=True)
class InspectRequest:
    """What the user asked ``inspect`` for."""

    checkpoint: Path | None = None
    example: str | None = None
    batch: Path | None = None
    model_spec: str | None = None
    trust: bool = False
    seed: int = 0
    train: bool = True
    device: str = "cpu"
    thresholds: Thresholds = field(default_factory=Thresholds)


def run_inspect(request: InspectRequest) -> Report:
    """Build the report for ``request``."""
    device = _device(request.device)
    if request.example is not None:
        model, batch = get_example(request.example).build(request.seed)
        source, kind = f"example:{request.example}", "example"
        notes: tuple[str, ...] = ()
    else:
        assert request.checkpoint is not None
        loaded = load_checkpoint(request.checkpoint, model_spec=request.model_spec, trust=request.trust)
        if request.batch is None:
            raise GradcheckError(
                "pass a sample batch with --input BATCH (a tensor, tuple or dict saved with torch.save)"
            )
        model, kind, notes = loaded.module, loaded.kind, loaded.notes
        batch = make_batch(load_batch_file(request.batch), model)
        source = str(request.checkpoint)
    model = model.to(device)
    return check(
        model,
        batch.to(device),
        seed=request.seed,
        train=request.train,
        thresholds=request.thresholds,
        source=source,
        checkpoint_kind=kind,
        notes=notes,
    )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GradcheckError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GradcheckError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
