"""Put a dict of tensors into an architecture: find the dict that fits, strip wrapper prefixes, load.

Loading follows ``load_state_dict``: strict by default (every key on both sides, every shape equal);
``strict=False`` (``--no-strict``) loads what fits and lists what was ignored or left at its initial value.
Shapes must match either way.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.factory import build_model, spec_notes, used_hyper_parameters
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.pickled_main import suggested_factory

PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes added by DDP/DataParallel, torch.compile and Lightning."""


def is_state_dict(value: Mapping[object, object]) -> bool:
    """A non-empty mapping of string keys to tensors."""
    return (
        bool(value)
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


@dataclass(frozen=True)
class Weights:
    """A dict of tensors found in a checkpoint, and where (``None``: the file is the state_dict itself)."""

    state: Mapping[str, torch.Tensor]
    key: str | None = None


def with_architecture(
    found: Sequence[Weights],
    path: Path,
    model_spec: str | None,
    kind: str,
    *,
    notes: tuple[str, ...] = (),
    strict: bool = True,
    model: nn.Module | None = None,
    hyper_parameters: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Build ``--model`` (or take ``model``, an architecture the file named) and load into it the found weights
    that fit it best, or say why none fits."""
    if model is None and model_spec is None:
        raise CheckpointError(f"{path} holds weights only ({len(found[0].state)} tensors); {model_hint(path)}")
    if model is None:
        assert model_spec is not None
        model = build_model(model_spec, hyper_parameters)
        if hyper_parameters:
            extra_args = used_hyper_parameters(model_spec, hyper_parameters)
            if extra_args:
                notes += (f"built with the checkpoint's hyper_parameters ({', '.join(extra_args)})",)
    expected = model.state_dict().keys()
    fits = [(weights, *align_keys(weights.state, expected)) for weights in found]
    best = max(fits, key=lambda fit: len(set(expected) & set(fit[1])))  # the first of equals: file order
    weights, aligned, stripped, dropped = best
    extra = list(spec_notes(model_spec)) if model_spec is not None else []
    if weights.key is not None:
        others = [w.key for w in found if w is not weights]
        also = f" (also found {', '.join(repr(k) for k in others)}; the one that fits the model was used)"
        extra.append(f"weights from {weights.key!r}" + (also if others else ""))
    if stripped:
        extra.append(f"stripped key prefix {'+'.join(repr(p) for p in stripped)}")
    if dropped:
        extra.append(f"ignored {dropped} tensors outside the model (prefix {stripped[-1]!r} selected the model's)")
    extra += load_weights(model, aligned, path, strict=strict)
    return LoadedModel(model, kind, notes + tuple(extra))


def model_hint(path: Path) -> str:
    """How to name the architecture for the weights in ``path``: the exact ``--model`` form."""
    return (
        f"name the architecture that fits them: gradcheck inspect {shlex.quote(str(path))} --model "
        f"{suggested_factory(path)} (a class or function that builds the model, in a .py file or an importable "
        "module: package.module:factory)"
    )


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


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, *, strict: bool) -> list[str]:
    """``load_state_dict`` with its ``strict`` meaning and a one-line error naming what does not fit;
    returns the notes for the report (non-strict: what was ignored, what kept its initial value).

    The keys are compared after the model's own load hooks ran (``weight_norm`` renames ``weight_g`` /
    ``weight_v`` of older checkpoints), as ``load_state_dict`` itself compares them."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes never load, strict or not
        problem = describe_mismatch(model, state) or first_line(exc)
        raise CheckpointError(f"the weights in {path} do not fit the --model architecture: {problem}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = [f"{len(missing)} missing key(s) (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})"] if unexpected else []
        raise CheckpointError(
            f"the weights in {path} do not fit the --model architecture: {'; '.join(parts)}; "
            "pass --no-strict to load what fits (load_state_dict(strict=False))"
        )
    notes = []
    if unexpected:
        notes.append(f"--no-strict: ignored {_listed(unexpected)} the model does not have")
    if missing:
        notes.append(f"--no-strict: {_listed(missing)} missing from the checkpoint kept initial values")
    return notes


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"{len(keys)} tensor(s) ({shown})"
