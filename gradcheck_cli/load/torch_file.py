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
from gradcheck_cli.load.factory import importable_from_cwd, is_script, script_definitions, spec_notes
from gradcheck_cli.load.limits import MemoryBudget, memory_budget, require_regular_file
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.pickled_main import main_classes, main_from, trust_command
from gradcheck_cli.load.safety import RefusedGlobal, load_tensors_only, unsafe_globals
from gradcheck_cli.load.self_described import (
    hf_config_entry,
    hyper_parameters,
    model_from_hf_config,
    named_class_spec,
)
from gradcheck_cli.load.sizes import ZIP_MAGIC, check_legacy_torch_file, check_tensors, check_zip_archive
from gradcheck_cli.load.sniff import PICKLE_PROTOCOL
from gradcheck_cli.load.weights import Weights, is_state_dict, with_architecture


def load_torch_file(
    path: Path, *, model_spec: str | None, trust: bool, budget: MemoryBudget | None = None, strict: bool = True
) -> LoadedModel:
    """Load a ``torch.save`` file (zip or legacy) into a module, its sizes checked against ``budget`` first."""
    script = model_spec if model_spec is not None and is_script(model_spec) else None
    content = read_torch_file(path, trust=trust, what="checkpoint", budget=budget, main_script=script)
    return _interpret(content, path, model_spec, strict=strict, trust=trust)


def read_torch_file(
    path: Path,
    *,
    trust: bool,
    what: str,
    error: type[GradcheckError] = CheckpointError,
    budget: MemoryBudget | None = None,
    main_script: str | None = None,
) -> Any:
    """``torch.load`` tensors-only; with ``trust``, fall back to full unpickling where that is needed
    (a pickle's ``__main__`` classes read from ``main_script``, the script that saved it).

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
    content = _load(path, trust=trust, what=what, main_script=main_script)
    check_tensors(content, source=path, what=what, error=error, budget=budget)
    return content


def _load(path: Path, *, trust: bool, what: str, main_script: str | None) -> Any:
    """The file's content, tensors-only unless ``trust`` and the file needs more."""
    try:
        return load_tensors_only(path)
    except RefusedGlobal as exc:  # a newer protocol's pickle names code
        unsafe = [exc.name]
    except pickle.UnpicklingError as exc:
        unsafe = unsafe_globals(path, exc)
        if not unsafe:
            raise CheckpointError(f"{path} is not a readable PyTorch {what}: {_reason(exc)}") from None
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path} is not a readable PyTorch {what}: {first_line(exc)}") from None
    _refuse_untrusted(path, unsafe, trust)
    return _unpickle(path, what, unsafe, main_script)


def _unpickle(path: Path, what: str, unsafe: list[str], main_script: str | None) -> Any:
    """Full unpickling (the user trusts the file); ``__main__`` classes come from ``main_script``."""
    importable_from_cwd()  # a pickled module's classes live in the user's project
    pickle_module: Any = None
    if main_classes(unsafe) and main_script is not None:
        pickle_module = main_from(script_definitions(main_script)[1].module)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    except (ModuleNotFoundError, AttributeError) as exc:
        if "__main__" in str(exc) or (main_classes(unsafe) and main_script is None):
            raise CheckpointError(
                f"the pickled {what} was saved from a script, so its classes ({', '.join(main_classes(unsafe))}) "
                f"live in that script's __main__; name it: {trust_command(path, unsafe)}"
            ) from None
        raise CheckpointError(
            f"the pickled {what} needs code that cannot be imported ({first_line(exc)}); run gradcheck where its "
            "package is importable (your project root, or set PYTHONPATH)"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} could not be unpickled: {first_line(exc)}") from None


def _refuse_untrusted(path: Path, unsafe: list[str], trust: bool) -> None:
    """Without ``trust``, a file whose pickle would import ``unsafe`` code is refused, naming it and the
    command that loads it (for a file the user trusts)."""
    if not trust:
        raise UntrustedCheckpointError(
            f"{path} would import and run code when unpickled ({', '.join(unsafe[:6])}"
            f"{', ...' if len(unsafe) > 6 else ''}); if you trust where it came from, run: "
            f"{trust_command(path, unsafe)}; or save tensors only (a state_dict)",
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


def _from_script(model: nn.Module, spec: str) -> bool:
    """Whether any of ``model``'s classes came from the script ``spec`` (a pickle's ``__main__``)."""
    script = script_definitions(spec)[1].module.__name__
    return any(type(m).__module__ == script for m in model.modules())


def _interpret(content: Any, path: Path, model_spec: str | None, *, strict: bool, trust: bool) -> LoadedModel:
    if isinstance(content, nn.Module):
        notes: tuple[str, ...] = ()
        if model_spec and is_script(model_spec) and _from_script(content, model_spec):
            notes = (f"the pickled model's __main__ classes read from {model_spec}", *spec_notes(model_spec))
        elif model_spec:
            notes = (f"--model {model_spec} ignored: the checkpoint holds a whole module",)
        return LoadedModel(content, "pickled_module", notes)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a model or a state_dict")
    if is_state_dict(content):
        return with_architecture([Weights(content)], path, model_spec, "state_dict", strict=strict)
    trained = training_evidence(content)
    modules, dicts = find_weights(content)
    if modules:
        key, module = modules[0]
        return LoadedModel(
            module, "training_checkpoint", (f"model taken from the checkpoint's {key!r} entry",), trained=trained
        )
    if not dicts:
        keys = ", ".join(repr(k) for k in list(content)[:8])
        raise CheckpointError(
            f"{path} is a dict without model weights (keys: {keys}): no entry holds a module or a dict of named "
            "tensors; save model.state_dict() (alone or under any key)"
        )
    found: tuple[str, ...] = (
        ("a Lightning checkpoint (hyper_parameters present)",) if "hyper_parameters" in content else ()
    )
    named = hf_config_entry(content) if model_spec is None else None
    model = None
    if named is not None:  # the file names its architecture: no --model needed
        model, note = model_from_hf_config(*named, path, {k for w in dicts for k in w.state})
        found += (note,)
    elif model_spec is None and (lightning := named_class_spec(content, path, trust)) is not None:
        model_spec, note = lightning
        found += (note,)
    loaded = with_architecture(
        dicts, path, model_spec, "training_checkpoint", notes=found, strict=strict, model=model,
        hyper_parameters=hyper_parameters(content),
    )  # fmt: skip
    return dataclasses.replace(loaded, trained=trained)


_SLOTS = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta", "sum"}


def _optimizer_slots(value: Mapping[str, Any]) -> bool:
    """One parameter's optimizer state (``{"exp_avg": ..., "step": ...}``), not weights."""
    return set(value) <= _SLOTS


def find_weights(content: Mapping[Any, Any], depth: int = 2) -> tuple[list[tuple[str, nn.Module]], list[Weights]]:
    """The modules and the dicts of named tensors a training checkpoint holds, recognised by content (not by
    key name), in file order, looking ``depth`` levels down (``{"model": {"ema": {...}}}``)."""
    modules: list[tuple[str, nn.Module]] = []
    dicts: list[Weights] = []
    for key, value in content.items():
        if isinstance(value, nn.Module):
            modules.append((str(key), value))
        elif isinstance(value, Mapping) and is_state_dict(value) and not _optimizer_slots(value):
            dicts.append(Weights(value, str(key)))
        elif isinstance(value, Mapping) and depth > 1:
            inner_modules, inner_dicts = find_weights(value, depth - 1)
            modules += [(f"{key}.{k}", m) for k, m in inner_modules]
            dicts += [Weights(w.state, f"{key}.{w.key}") for w in inner_dicts]
    return modules, dicts
