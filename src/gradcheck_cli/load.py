"""Load a checkpoint, recognised by content: a pickled module, a state_dict or training dict, TorchScript.

Nothing is unpickled beyond tensors unless the user passed ``--trust``.
"""

from __future__ import annotations

import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, UntrustedCheckpointError, first_line
from gradcheck_cli.factory import build_model

STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "net")
"""Keys under which training checkpoints keep the weights, in the order they are tried."""
PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes added by DDP/DataParallel, torch.compile and Lightning."""
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
PICKLE_PROTOCOL = b"\x80"
"""Legacy (non-zip) torch files are a sequence of pickles, each starting with the PROTO opcode."""
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class LoadedModel:
    """A module ready to probe, the kind of file it came from, and what the loader had to do."""

    module: nn.Module
    kind: str
    """``pickled_module``, ``state_dict``, ``training_checkpoint`` or ``torchscript``."""
    notes: tuple[str, ...] = ()


def load_checkpoint(path: Path, *, model_spec: str | None, trust: bool) -> LoadedModel:
    """Load ``path`` into a CPU module; raise :class:`CheckpointError` with one line saying what to do."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass the checkpoint file itself (Hugging Face directories are not supported yet)"
        )
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(LFS_POINTER):
        raise CheckpointError(f"{path} is a git-LFS pointer, not the checkpoint; run `git lfs pull` first")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and not head.startswith(PICKLE_PROTOCOL):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a legacy torch pickle)"
        )
    if is_zip and _is_torchscript(path):
        return LoadedModel(_load_torchscript(path), "torchscript")
    content = _torch_load(path, trust=trust)
    return _interpret(content, path, model_spec)


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} looks like TorchScript but could not be loaded: {first_line(exc)}") from None
    return module


def _torch_load(path: Path, *, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, exc)
        if not unsafe:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first_line(exc)}") from None
        if not trust:
            raise UntrustedCheckpointError(
                f"{path} would import and run code when unpickled ({', '.join(unsafe)}); "
                "pass --trust only if you trust where it came from, or save a state_dict instead",
                unsafe,
            ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first_line(exc)}") from None
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise CheckpointError(
            f"the pickled model needs code that cannot be imported ({first_line(exc)}); run gradcheck where the "
            "model's package is importable (your project root, or set PYTHONPATH)"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} could not be unpickled: {first_line(exc)}") from None


def _unsafe_globals(path: Path, error: pickle.UnpicklingError) -> list[str]:
    """The globals the file would import; empty when the failure was not about code (a corrupt file).

    Zip archives are scanned without executing anything; for legacy files, and as a cross-check,
    the weights-only unpickler's own error names the first global it refused.
    """
    named = _BLOCKED_GLOBAL.findall(str(error))
    if not named:
        return []
    try:
        scanned = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files cannot be scanned
        scanned = []
    return scanned or named


def _interpret(content: Any, path: Path, model_spec: str | None) -> LoadedModel:
    if isinstance(content, nn.Module):
        notes = (f"--model {model_spec} ignored: the checkpoint holds a whole module",) if model_spec else ()
        return LoadedModel(content, "pickled_module", notes)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a model or a state_dict")
    if _is_state_dict(content):
        return _with_architecture(content, path, model_spec, "state_dict", ())
    for key in STATE_DICT_KEYS:
        value = content.get(key)
        if isinstance(value, nn.Module):
            return LoadedModel(value, "training_checkpoint", (f"model taken from the checkpoint's {key!r} entry",))
        if isinstance(value, Mapping) and value and _is_state_dict(value):
            return _with_architecture(value, path, model_spec, "training_checkpoint", (f"weights from {key!r}",))
    keys = ", ".join(repr(k) for k in list(content)[:8])
    raise CheckpointError(
        f"{path} is a dict without model weights (keys: {keys}); expected a state_dict or one under "
        f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}"
    )


def _is_state_dict(value: Mapping[Any, Any]) -> bool:
    return (
        bool(value)
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _with_architecture(
    state: Mapping[str, torch.Tensor], path: Path, model_spec: str | None, kind: str, notes: tuple[str, ...]
) -> LoadedModel:
    if model_spec is None:
        raise CheckpointError(
            f"{path} holds weights only ({len(state)} tensors); name the architecture with "
            "--model package.module:factory (or path/to/file.py:factory)"
        )
    model = build_model(model_spec)
    aligned, stripped, dropped = align_keys(state, model.state_dict().keys())
    _load_strict(model, aligned, path)
    extra = []
    if stripped:
        extra.append(f"stripped key prefix {'+'.join(repr(p) for p in stripped)}")
    if dropped:
        extra.append(f"ignored {dropped} tensors outside the model (prefix {stripped[-1]!r} selected the model's)")
    return LoadedModel(model, kind, notes + tuple(extra))


def align_keys(state: Mapping[str, torch.Tensor], expected: Any) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Strip DDP/compile/Lightning prefixes while that matches more of the model's keys.

    Returns the aligned dict, the prefixes stripped in order, and how many tensors were
    dropped because they lay outside the prefix (a Lightning module's own extra tensors).
    """
    wanted = set(expected)
    current = dict(state)
    stripped: list[str] = []
    dropped = 0
    improved = True
    while improved:
        improved = False
        for prefix in PREFIXES:
            inside = {k[len(prefix) :]: v for k, v in current.items() if k.startswith(prefix)}
            if not inside:
                continue
            candidate = (
                inside
                if len(inside) < len(current) and wanted <= set(inside)
                else {**{k: v for k, v in current.items() if not k.startswith(prefix)}, **inside}
            )
            if len(wanted & set(candidate)) > len(wanted & set(current)):
                dropped += len(current) - len(candidate)
                current = candidate
                stripped.append(prefix)
                improved = True
    return current, stripped, dropped


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatch = next((k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)), None)
    if missing or unexpected or mismatch:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
        if mismatch:
            parts.append(
                f"shape mismatch at {mismatch}: checkpoint {list(state[mismatch].shape)}, "
                f"model {list(own[mismatch].shape)}"
            )
        raise CheckpointError(f"the weights in {path} do not fit the --model architecture: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
