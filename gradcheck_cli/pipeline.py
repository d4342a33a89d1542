"""The inspect pipeline for files and examples: load → batch → check (probe, diagnose, advise)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gradcheck_cli.api import check
from gradcheck_cli.errors import GradcheckError, first_line
from gradcheck_cli.load import LoadedModel, load_checkpoint
from gradcheck_cli.load.batch import Batch, make_batch
from gradcheck_cli.load.batch_file import load_batch_file
from gradcheck_cli.load.examples import get_example
from gradcheck_cli.load.synthetic import inferred_batch, shaped_batch
from gradcheck_cli.report.report import Report
from gradcheck_cli.settings import Distributed, ProbeSettings, Provenance
from gradcheck_cli.timing import phase


@dataclass(frozen=True)
class InspectRequest:
    """What the user asked ``inspect`` for: what to load, where to run it, and how to probe it."""

    checkpoint: Path | None = None
    example: str | None = None
    batch: Path | None = None
    model_spec: str | None = None
    trust: bool = False
    strict: bool = True
    """``load_state_dict``'s strict for weights loaded into ``--model``."""
    device: str = "cpu"
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    """How to probe: also seeds the example's weights and an inferred or shaped batch."""
    distributed: Distributed | None = None
    """Run under torchrun, each rank on its slice of the batch, the model wrapped this way."""
    timeout: float = 300.0
    """Seconds a collective may wait for the other ranks (``--distributed``)."""


def run_inspect(request: InspectRequest) -> Report:
    """Build the report for ``request`` (under torchrun with ``distributed``: every rank builds the same one)."""
    if request.distributed is None:
        return _run(request, _device(request.device))
    from gradcheck_cli.distributed.launch import process_group

    with process_group(_device(request.device), request.timeout) as device:
        return _run(request, device)


def _run(request: InspectRequest, device: torch.device) -> Report:
    if request.distributed is not None:
        from gradcheck_cli.distributed.reduce import agreed

        if request.distributed is Distributed.fsdp and _is_dcp(request.checkpoint):
            return _check_sharded_dcp(request, device)
        model, batch, provenance = agreed("loading the model and the batch", lambda: _load(request, device))
        return _check_distributed(request, model, batch, provenance, device)
    model, batch, provenance = _load(request, device)
    return check(model, batch, request.settings, provenance)


def _is_dcp(path: Path | None) -> bool:
    from gradcheck_cli.load.sniff import Kind, sniff

    return path is not None and path.is_dir() and sniff(path) is Kind.DCP


def _unverified(request: InspectRequest) -> ProbeSettings:
    """A distributed run's settings: fixes are not tried on copies across ranks."""
    return dataclasses.replace(request.settings, verify=False)


def _check_sharded_dcp(request: InspectRequest, device: torch.device) -> Report:
    """FSDP2 over a DCP directory: shard the architecture first, then each rank reads only its own shards."""
    from gradcheck_cli.distributed.launch import rank, world, wrap
    from gradcheck_cli.distributed.reduce import agreed, split_batch
    from gradcheck_cli.load.dcp import load_dcp_sharded, plan_dcp

    assert request.checkpoint is not None
    path = request.checkpoint
    plan = agreed("reading the checkpoint", lambda: plan_dcp(path, model_spec=request.model_spec, trust=request.trust))
    wrapped, loaded = agreed(
        "loading the sharded checkpoint",
        lambda: load_dcp_sharded(plan, trust=request.trust, shard=lambda m: wrap(m.to(device), "fsdp", device)),
    )

    def local_batch() -> tuple[Batch, str]:
        whole, source = _choose_batch(request, loaded)
        return split_batch(whole, rank(), world()).to(device), source

    batch, batch_source = agreed("loading and splitting the batch", local_batch)
    provenance = Provenance(
        source=str(path), checkpoint_kind=loaded.kind, batch_source=batch_source, notes=loaded.notes,
        trained=loaded.trained,
    )  # fmt: skip
    return check(wrapped, batch, _unverified(request), provenance)


def _check_distributed(
    request: InspectRequest, model: torch.nn.Module, batch: Batch, provenance: Provenance, device: torch.device
) -> Report:
    from gradcheck_cli.distributed.launch import rank, world, wrap
    from gradcheck_cli.distributed.reduce import agreed, split_batch

    assert request.distributed is not None
    mode = request.distributed.value

    local = agreed("splitting the batch", lambda: split_batch(batch, rank(), world()))
    wrapped = agreed(f"wrapping the model ({mode})", lambda: wrap(model, mode, device))
    return check(wrapped, local, _unverified(request), provenance)


def _load(request: InspectRequest, device: torch.device) -> tuple[torch.nn.Module, Batch, Provenance]:
    """The model and batch on ``device``, and where they came from."""
    if request.example is not None:
        model, batch = get_example(request.example).build(request.settings.seed)
        name = f"example:{request.example}"
        provenance = Provenance(source=name, checkpoint_kind="example", batch_source=name)
    else:
        assert request.checkpoint is not None
        with phase("load"):
            loaded = load_checkpoint(
                request.checkpoint, model_spec=request.model_spec, trust=request.trust, strict=request.strict
            )
            batch, batch_source = _choose_batch(request, loaded)
        model = loaded.module
        provenance = Provenance(
            source=str(request.checkpoint), checkpoint_kind=loaded.kind, batch_source=batch_source,
            notes=loaded.notes, trained=loaded.trained,
        )  # fmt: skip
    try:
        with phase("load"):
            model, batch = model.to(device), batch.to(device)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise GradcheckError(f"cannot move the model and batch to --device {device}: {first_line(exc)}") from None
    return model, batch, provenance


def _choose_batch(request: InspectRequest, loaded: LoadedModel) -> tuple[Batch, str]:
    """The batch to probe with, and where it came from: --input, --input-shape, the file's own, or inferred."""
    model = loaded.module
    seed = request.settings.seed
    if request.batch is not None:
        # batches are tensors only (DESIGN §1), also with --trust, which is about the checkpoint
        return make_batch(load_batch_file(request.batch), model), f"--input {request.batch}"
    if request.input_shape is not None:
        return shaped_batch(model, request.input_shape, request.input_dtype, seed)
    if loaded.example_batch is not None:
        return loaded.example_batch, "the example inputs stored in the checkpoint"
    return inferred_batch(model, seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GradcheckError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise GradcheckError(f"--device {name}: {device.type} devices hold no data to measure; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GradcheckError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
