"""``torch.distributed.checkpoint`` (DCP) directories: a ``.metadata`` pickle and ``*.distcp`` shard files.

DCP's own reader unpickles ``.metadata`` with plain :func:`pickle.load` and the non-tensor ("bytes")
entries with ``torch.load(weights_only=False)``. Here, without ``--trust``:

* ``.metadata`` is read by :mod:`gradcheck_cli.load.dcp_metadata`'s restricted unpickler, which imports
  only the classes DCP metadata holds and refuses anything else, naming it;
* tensor entries are read by DCP's :class:`FileSystemReader` (``torch.load(weights_only=True)``);
* non-tensor entries are read only where gradcheck needs them (a module's ``_extra_state``, a top-level
  step counter), always tensors-only first; one that needs code is unpickled only with ``--trust``.
  Every other non-tensor entry (optimizer hyper-parameters, custom objects) is never read.

The pieces are separate so that a distributed path (``torchrun``, the model's parameters as sharded
DTensors) can reuse them: :func:`~gradcheck_cli.load.dcp_metadata.read_metadata` and
:func:`~gradcheck_cli.load.dcp_metadata.check_shards`, :func:`match_keys` on the
model's state_dict keys, and :func:`load_into` with the sharded targets and ``no_dist=False``.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, UntrustedCheckpointError, first_line
from gradcheck_cli.load.dcp_metadata import check_shards, read_metadata
from gradcheck_cli.load.factory import build_model, importable_from_cwd
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.sizes import check_zip_bytes
from gradcheck_cli.load.torch_file import OPTIMIZER_KEYS, STEP_KEYS, training_evidence
from gradcheck_cli.load.weights import align_keys, describe_mismatch

# --------------------------------------------------------------------------- reading entries


def _reader(directory: Path, metadata: Any) -> Any:
    """A :class:`FileSystemReader` that hands out the already-checked ``metadata`` instead of unpickling."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class _CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    return _CheckedReader(directory)


def _planner(directory: Path, *, trust: bool) -> Any:
    """DCP's default planner, with non-tensor entries read tensors-only unless ``trust``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            self.state_dict[fqn] = read_entry(value.getvalue(), fqn, directory, trust=trust)

    # keys are already the checkpoint's flat keys; never resize or re-key what the caller allocated
    return _TensorsOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def read_entry(data: bytes, key: str, directory: Path, *, trust: bool) -> Any:
    """A non-tensor entry (a ``torch.save`` blob): tensors-only, or fully with ``trust``."""
    from gradcheck_cli.load.safety import unsafe_globals

    check_zip_bytes(data, f"the entry {key!r} of {directory}", error=CheckpointError)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            unsafe = unsafe_globals(data, exc) or ["code"]
            raise UntrustedCheckpointError(
                f"the entry {key!r} of {directory} would import and run code when unpickled "
                f"({', '.join(unsafe)}); pass --trust only if you trust where it came from",
                unsafe,
            ) from None
    importable_from_cwd()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_into(directory: Path, metadata: Any, targets: dict[str, Any], *, trust: bool, no_dist: bool = True) -> None:
    """Fill ``targets`` (checkpoint key → pre-allocated tensor or DTensor, or a placeholder for a non-tensor
    entry) from the shards with ``dcp.load``; ``no_dist`` loads in this process without a process group.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    if not targets:
        return
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp_load(
                targets,
                storage_reader=_reader(directory, metadata),
                planner=_planner(directory, trust=trust),
                no_dist=no_dist,
            )
    except CheckpointException as exc:  # a BaseException: wraps what failed on each rank
        failures = [failure[0] if isinstance(failure, tuple) else failure for failure in exc.failures.values()]
        cause = failures[0] if failures else exc
        if isinstance(cause, CheckpointError):
            raise cause from None
        raise CheckpointError(
            f"the shards of {directory} could not be read ({first_line(cause)}); are they damaged?"
        ) from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"the shards of {directory} could not be read ({first_line(exc)}); are they damaged?"
        ) from None


# --------------------------------------------------------------------------- matching the model


@dataclasses.dataclass(frozen=True)
class KeyMatch:
    """Which checkpoint entry each of the model's state_dict keys is read from."""

    source: dict[str, str]
    """model key → checkpoint key"""
    optimizer: tuple[str, ...]
    """The checkpoint's optimizer entries, left out of the matching."""
    notes: tuple[str, ...]
    """Prefixes stripped, entries left out, in plain words."""


def match_keys(metadata: Any, model: nn.Module, model_state: Mapping[str, Any], directory: Path) -> KeyMatch:
    """Map the model's state_dict keys onto the checkpoint's, stripping ``model.``/``module.``/``_orig_mod.``
    where that matches more keys; a misfit raises the same one-line error as every weights-only loader.

    ``model_state`` is ``model.state_dict()`` (a distributed caller passes the sharded one: only keys and
    global shapes are compared). Optimizer entries (``optimizer.*``, ``optim.*``...) are left out first,
    so that a misfit names the model's keys, not the optimizer's.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = metadata.state_dict_metadata
    model_roots = {key.split(".", 1)[0] for key in model_state}
    optimizer = [k for k in entries if k.split(".", 1)[0] in OPTIMIZER_KEYS and k.split(".", 1)[0] not in model_roots]
    left_out = set(optimizer)
    placeholders: dict[str, torch.Tensor] = {}  # meta tensors of the stored shapes, for align_keys
    for key, entry in entries.items():
        if key not in left_out:
            stored = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else (0,)
            placeholders[key] = torch.empty(stored, device="meta")
    origin = {id(tensor): key for key, tensor in placeholders.items()}
    aligned, stripped, dropped = align_keys(placeholders, model_state.keys())
    objects = [k for k, v in model_state.items() if not isinstance(v, torch.Tensor)]  # modules' _extra_state
    problems = [describe_mismatch(model, {k: v for k, v in aligned.items() if k not in objects}, objects)]
    absent = [k for k in objects if k not in aligned]
    if absent:
        problems.append(f"{len(absent)} missing key(s) (first: {absent[0]})")
    stored_tensor = {k: isinstance(entries[origin[id(v)]], TensorStorageMetadata) for k, v in aligned.items()}
    clash = [k for k, v in model_state.items() if k in aligned and isinstance(v, torch.Tensor) != stored_tensor[k]]
    if clash:
        problems.append(f"{clash[0]} is a tensor in one of them and not in the other")
    problem = "; ".join(p for p in problems if p)
    if problem:
        raise CheckpointError(f"the weights in {directory} do not fit the --model architecture: {problem}")
    notes = []
    if stripped:
        notes.append(f"stripped key prefix {'+'.join(repr(p) for p in stripped)}")
    if optimizer:
        roots = sorted({k.split(".", 1)[0] for k in optimizer})
        notes.append(f"ignored {_entries(len(optimizer))} of optimizer state (under {', '.join(map(repr, roots))})")
    if dropped:
        notes.append(f"ignored {_entries(dropped)} outside the model (prefix {stripped[-1]!r} selected the model's)")
    return KeyMatch({key: origin[id(aligned[key])] for key in model_state}, tuple(optimizer), tuple(notes))


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


# --------------------------------------------------------------------------- the one-process path


@dataclasses.dataclass(frozen=True)
class DcpPlan:
    """What a load checks before reading any tensor (no collective): the metadata, the shards, the architecture,
    and which checkpoint entry each of the model's keys comes from."""

    path: Path
    metadata: Any
    model: nn.Module
    match: KeyMatch


def plan_dcp(path: Path, *, model_spec: str | None, trust: bool) -> DcpPlan:
    """Read and check the metadata and the shard files, build the ``--model`` architecture, match the keys."""
    metadata = read_metadata(path, trust=trust)
    check_shards(path, metadata)
    entries: Mapping[str, Any] = metadata.state_dict_metadata
    if not entries:
        raise CheckpointError(f"{path} is a DCP checkpoint with no entries")
    if model_spec is None:
        raise CheckpointError(
            f"{path} holds weights only ({len(entries)} entries); name the architecture with "
            "--model package.module:factory (or path/to/file.py:factory)"
        )
    model = build_model(model_spec)
    return DcpPlan(path, metadata, model, match_keys(metadata, model, model.state_dict(), path))


def _targets(plan: DcpPlan) -> dict[str, Any]:
    """Checkpoint key → the model's own tensor (a DTensor shard once sharded) to load it into."""
    own = plan.model.state_dict()
    return {plan.match.source[k]: (v.detach() if isinstance(v, torch.Tensor) else None) for k, v in own.items()}


def _loaded(plan: DcpPlan, targets: Mapping[str, Any], *, trust: bool, notes: tuple[str, ...] = ()) -> LoadedModel:
    trained, counters, step_notes = _training_evidence(plan.path, plan.metadata, plan.match, trust=trust)
    unread = _unread_note(plan.metadata.state_dict_metadata, {*targets, *plan.match.optimizer, *counters})
    return LoadedModel(plan.model, "dcp", (*plan.match.notes, *step_notes, *unread, *notes), trained=trained)


def load_dcp_directory(path: Path, *, model_spec: str | None, trust: bool) -> LoadedModel:
    """Load a DCP directory into the ``--model`` architecture, in this process."""
    plan = plan_dcp(path, model_spec=model_spec, trust=trust)
    targets = _targets(plan)
    load_into(path, plan.metadata, targets, trust=trust)  # tensors land in the model's own storage
    loaded = {key: targets[source] for key, source in plan.match.source.items()}
    try:
        plan.model.load_state_dict(loaded, strict=True)  # runs set_extra_state and the modules' load hooks
    except Exception as exc:
        raise CheckpointError(f"the weights in {path} do not fit the --model architecture: {first_line(exc)}") from None
    return _loaded(plan, targets, trust=trust)


def _training_evidence(
    path: Path, metadata: Any, match: KeyMatch, *, trust: bool
) -> tuple[str | None, list[str], tuple[str, ...]]:
    """Why the checkpoint comes from training (optimizer state, a top-level step counter read tensors-only),
    the counters read, and notes on those that need ``--trust``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries: Mapping[str, Any] = metadata.state_dict_metadata
    content: dict[str, Any] = {}
    for key in match.optimizer:
        content.setdefault(key.split(".", 1)[0], []).append(key)
    read: list[str] = []
    notes: list[str] = []
    for key in STEP_KEYS:
        entry = entries.get(key)
        if entry is None or key in match.source.values():
            continue
        if isinstance(entry, TensorStorageMetadata):
            if entry.size.numel() != 1:
                continue
            target: dict[str, Any] = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)}
        else:
            target = {key: None}
        try:
            load_into(path, metadata, target, trust=trust)
        except UntrustedCheckpointError:
            notes.append(f"the entry {key!r} needs --trust to read; not used as evidence of training")
            continue
        read.append(key)
        content[key] = target[key]
    return training_evidence(content), read, tuple(notes)


def _unread_note(entries: Mapping[str, Any], accounted: set[str]) -> tuple[str, ...]:
    """A note on the non-tensor entries that were never read (nothing in them runs, nothing is needed)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    unread = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata) and k not in accounted]
    if not unread:
        return ()
    return (
        f"{_entries(len(unread))} holding Python objects not read (first: {unread[0]!r}); the model does not need them",
    )


def load_dcp_sharded(
    plan: DcpPlan, *, trust: bool, shard: Callable[[nn.Module], nn.Module]
) -> tuple[nn.Module, LoadedModel]:
    """Under torchrun with FSDP2, after every rank's plan succeeded: shard the architecture (``shard``), then
    every rank reads only its own pieces of the checkpoint into its shards (``dcp.load``'s collectives)."""
    wrapped = shard(plan.model)
    targets = _targets(plan)  # after fully_shard: DTensor shards of this rank
    load_into(plan.path, plan.metadata, targets, trust=trust, no_dist=False)
    return wrapped, _loaded(plan, targets, trust=trust, notes=("each rank read only its own shards of the checkpoint",))
