"""Put a dict of tensors into an architecture: strip wrapper prefixes, then load strictly."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError
from gradcheck_cli.load.factory import build_model
from gradcheck_cli.load.loaded import LoadedModel

PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes added by DDP/DataParallel, torch.compile and Lightning."""


def is_state_dict(value: Mapping[object, object]) -> bool:
    """A non-empty mapping of string keys to tensors."""
    return (
        bool(value)
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def with_architecture(
    state: Mapping[str, torch.Tensor], path: Path, model_spec: str | None, kind: str, notes: tuple[str, ...] = ()
) -> LoadedModel:
    """Build ``--model`` and load ``state`` into it, or say why it does not fit."""
    if model_spec is None:
        raise CheckpointError(
            f"{path} holds weights only ({len(state)} tensors); name the architecture with "
            "--model package.module:factory (or path/to/file.py:factory)"
        )
    model = build_model(model_spec)
    aligned, stripped, dropped = align_keys(state, model.state_dict().keys())
    load_strict(model, aligned, path)
    extra = []
    if stripped:
        extra.append(f"stripped key prefix {'+'.join(repr(p) for p in stripped)}")
    if dropped:
        extra.append(f"ignored {dropped} tensors outside the model (prefix {stripped[-1]!r} selected the model's)")
    return LoadedModel(model, kind, notes + tuple(extra))


def align_keys(
    state: Mapping[str, torch.Tensor], expected: Iterable[str]
) -> tuple[dict[str, torch.Tensor], list[str], int]:
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


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], allowed_missing: Iterable[str] = ()) -> str:
    """Missing and unexpected keys and the first shape mismatch, or '' when ``state`` fits ``model``."""
    own = model.state_dict()
    tolerated = set(allowed_missing)
    missing = [k for k in own if k not in state and k not in tolerated]
    unexpected = [k for k in state if k not in own]
    mismatch = next((k for k in own if k in state and _shape(own[k]) != _shape(state[k])), None)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
    if mismatch:
        parts.append(
            f"shape mismatch at {mismatch}: checkpoint {_shape(state[mismatch])}, model {_shape(own[mismatch])}"
        )
    return "; ".join(parts)


def _shape(value: object) -> list[int] | None:
    """A tensor's shape; None for what a state_dict may hold besides tensors (a module's ``_extra_state``)."""
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)``, with a one-line error naming what does not fit."""
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"the weights in {path} do not fit the --model architecture: {problem}")
    model.load_state_dict(state, strict=True)
