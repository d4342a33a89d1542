"""Files written by ``torch.save``: a state_dict, a training checkpoint or a whole pickled module.

Read with ``weights_only=True`` (passed explicitly: left out, an environment variable can switch
torch to unsafe loading); anything more (a pickled module, custom classes) needs ``--trust``.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, GradcheckError, UntrustedCheckpointError, first_line
from gradcheck_cli.load.factory import importable_from_cwd
from gradcheck_cli.load.limits import MemoryBudget, memory_budget, require_regular_file
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.safety import RefusedGlobal, load_tensors_only, unsafe_globals
from gradcheck_cli.load.sizes import ZIP_MAGIC, check_legacy_torch_file, check_tensors, check_zip_archive
from gradcheck_cli.load.sniff import PICKLE_PROTOCOL
from gradcheck_cli.load.weights import is_state_dict, with_architecture

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "net")
"""Keys under which training checkpoints keep the weights, in the order they are tried."""


def load_torch_file(
    path: Path, *, model_spec: str | None, trust: bool, budget: MemoryBudget | None = None
) -> LoadedModel:
    """Load a ``torch.save`` file (zip or legacy) into a module, its sizes checked against ``budget`` first."""
    content = read_torch_file(path, trust=trust, what="checkpoint", budget=budget)
    return _interpret(content, path, model_spec)


def read_torch_file(
    path: Path,
    *,
    trust: bool,
    what: str,
    error: type[GradcheckError] = CheckpointError,
    budget: MemoryBudget | None = None,
) -> Any:
    """``torch.load`` tensors-only; with ``trust``, fall back to full unpickling where that is needed.

    Sizes come first (``error`` with one line when over ``budget``, the process-wide one by default): the
    file must be a regular file, a zip's records and a legacy file's storages must fit before anything is
    read, and every loaded tensor must be backed by its storage before anything could materialise it.
    """
    budget = budget if budget is not None else memory_budget()
    size = require_regular_file(path, error, what)
    with path.open("rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head == ZIP_MAGIC:
        check_zip_archive(path, what=what, error=error, budget=budget)
    elif head.startswith(PICKLE_PROTOCOL):
        check_legacy_torch_file(path, size, what=what, error=error, budget=budget)
    content = _load(path, trust=trust, what=what)
    check_tensors(content, source=path, what=what, error=error, budget=budget)
    return content


def _load(path: Path, *, trust: bool, what: str) -> Any:
    """The file's content, tensors-only unless ``trust`` and the file needs more."""
    try:
        return load_tensors_only(path)
    except RefusedGlobal as exc:  # a newer protocol's pickle names code
        _refuse_untrusted(path, [exc.name], trust)
    except pickle.UnpicklingError as exc:
        unsafe = unsafe_globals(path, exc)
        if not unsafe:
            raise CheckpointError(f"{path} is not a readable PyTorch {what}: {_reason(exc)}") from None
        _refuse_untrusted(path, unsafe, trust)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is not a readable PyTorch {what}: {first_line(exc)}") from None
    importable_from_cwd()  # a pickled module's classes live in the user's project
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CheckpointError(
            f"the pickled {what} needs code that cannot be imported ({first_line(exc)}); run gradcheck where its "
            "package is importable (your project root, or set PYTHONPATH)"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} could not be unpickled: {first_line(exc)}") from None


def _refuse_untrusted(path: Path, unsafe: list[str], trust: bool) -> None:
    """Without ``trust``, a file whose pickle would import ``unsafe`` code is refused, naming it."""
    if not trust:
        raise UntrustedCheckpointError(
            f"{path} would import and run code when unpickled ({', '.join(unsafe)}); "
            "pass --trust only if you trust where it came from, or save tensors only (a state_dict)",
            unsafe,
        ) from None


def _reason(error: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own reason, not torch's advice to retry with weights_only=False."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        after = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        detail = after[0].strip() if after and after[0].strip() else "unreadable pickle"
        return f"{detail} (the file is damaged or not a torch file)"
    reason = first_line(error)
    return "the file is damaged or not a torch file" if reason.startswith("Weights only load failed") else reason


OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states", "optim", "opt_state")
STEP_KEYS = ("epoch", "global_step", "step", "iteration", "iter")


def training_evidence(content: Mapping[Any, Any]) -> str | None:
    """Why a training-checkpoint dict comes from training (optimizer state, a positive step count), or None."""
    reasons = [f"optimizer state ({key!r})" for key in OPTIMIZER_KEYS if _present(content.get(key))]
    for key in STEP_KEYS:
        value = content.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value.item())  # a step counter saved as a 0-dim tensor
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            reasons.append(f"{key} {value:g}")
    return f"the checkpoint holds {' and '.join(reasons)}" if reasons else None


def _present(value: Any) -> bool:
    """A non-empty optimizer entry (a tensor is judged by its size, never by its truth value)."""
    if isinstance(value, torch.Tensor):
        return value.numel() > 0
    return bool(value)


def _interpret(content: Any, path: Path, model_spec: str | None) -> LoadedModel:
    if isinstance(content, nn.Module):
        notes = (f"--model {model_spec} ignored: the checkpoint holds a whole module",) if model_spec else ()
        return LoadedModel(content, "pickled_module", notes)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a model or a state_dict")
    if is_state_dict(content):
        return with_architecture(content, path, model_spec, "state_dict")
    trained = training_evidence(content)
    for key in STATE_DICT_KEYS:
        value = content.get(key)
        if isinstance(value, nn.Module):
            notes = (f"model taken from the checkpoint's {key!r} entry",)
            return LoadedModel(value, "training_checkpoint", notes, trained=trained)
        if isinstance(value, Mapping) and is_state_dict(value):
            found = [f"weights from {key!r}"]
            if "hyper_parameters" in content:
                found.append("a Lightning checkpoint (hyper_parameters present)")
            loaded = with_architecture(value, path, model_spec, "training_checkpoint", tuple(found))
            return dataclasses.replace(loaded, trained=trained)
    keys = ", ".join(repr(k) for k in list(content)[:8])
    raise CheckpointError(
        f"{path} is a dict without model weights (keys: {keys}); expected a state_dict or one under "
        f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}"
    )
