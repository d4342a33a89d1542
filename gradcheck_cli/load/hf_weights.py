"""Hugging Face weights: which files to read, reading them as tensors only, and fitting them to the model.

transformers never opens a weights file: safetensors are read with :mod:`safetensors`,
``pytorch_model.bin`` with the tensors-only ``torch.load`` of
:func:`~gradcheck_cli.load.torch_file.read_torch_file` (full unpickling only with ``--trust``).
The fitting rules are described in :mod:`gradcheck_cli.load.hf_dir`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.limits import MemoryBudget, MiB, format_bytes, memory_budget, require_regular_file
from gradcheck_cli.load.sizes import raise_hint
from gradcheck_cli.load.weights import is_state_dict
from gradcheck_cli.parsing import MalformedDocument, loads_json

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)
"""The weight files looked for, in order of preference (safetensors first, as ``from_pretrained``)."""

UNREAD_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")
"""Other files that look like weights, named in the 'no weights' error so the user sees why."""

LEGACY_RENAMES = (
    ("LayerNorm.gamma", "LayerNorm.weight"),
    ("LayerNorm.beta", "LayerNorm.bias"),
    (".weight_g", ".parametrizations.weight.original0"),
    (".weight_v", ".parametrizations.weight.original1"),
)
"""Old key names that ``from_pretrained`` still accepts (TF-era BERT layer norms, ``weight_norm``)."""

MAX_LISTED = 3
JSON_MAX_BYTES = 64 * MiB
"""The largest ``config.json`` or shard index read (real ones are kilobytes; parsing JSON takes ~10x its size)."""


@dataclass
class Fit:
    """The checkpoint's tensors under the model's key names, and what had to be done to get there."""

    state: dict[str, torch.Tensor]
    added_prefix: int = 0
    stripped_prefix: int = 0
    renamed: list[str] = field(default_factory=list)
    needs_conversion: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)
    own_buffers: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- weight files


def read_json(path: Path) -> Any:
    """A JSON file's content, or a one-line :class:`CheckpointError` for an unreadable, oversized or invalid file."""
    size = require_regular_file(path, CheckpointError, "file")
    if size > JSON_MAX_BYTES:
        raise CheckpointError(
            f"{path} is {format_bytes(size)}; a config or shard index is a few KiB and gradcheck reads at most "
            f"{format_bytes(JSON_MAX_BYTES)} of JSON: is it the right file?"
        )
    try:
        return loads_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, MalformedDocument) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {first_line(exc)}") from None


def weight_files(path: Path) -> tuple[list[Path], str, str, dict[str, str] | None]:
    """The files to read, how to describe them, which weight files were passed over, and a shard index's map."""
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise CheckpointError(f"no weights in {path}: looked for {', '.join(WEIGHT_FILES)}{_unread_hint(path)}")
    chosen = present[0]
    skipped = ", ".join(n for n in present[1:] if not n.startswith(chosen.split(".")[0]))
    if not chosen.endswith(".index.json"):
        return [path / chosen], chosen, skipped, None
    shards, weight_map = _shards(path / chosen)
    return shards, f"{len(shards)} shard(s) listed in {chosen}", skipped, weight_map


def _unread_hint(path: Path) -> str:
    try:
        others = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(UNREAD_SUFFIXES))
    except OSError:
        return ""
    if not others:
        return ""
    listed = ", ".join(others[:MAX_LISTED]) + (", ..." if len(others) > MAX_LISTED else "")
    return f" (it holds {listed}, which gradcheck does not read under those names)"


def _shards(index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files a ``*.index.json`` lists, each checked to lie in the directory and exist."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f'{index} is not a shard index (no "weight_map" of tensor names to files)')
    shards: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{index} names shard {name!r}, which is not a file name inside {index.parent}")
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index} lists shard {name}, which is missing from {index.parent}")
        shards.append(shard)
    return shards, weight_map


def read_weights(
    files: list[Path], path: Path, listed: Mapping[str, str] | None, *, trust: bool, budget: MemoryBudget | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of the weight files, merged; ``.bin`` files read tensors-only unless ``trust``.

    ``listed``: a shard index's map of tensor names to files; every name must be in the shards. The files'
    total size is checked against ``budget`` (the process-wide one by default) before any is read.
    """
    from gradcheck_cli.load.safetensors_file import read_safetensors
    from gradcheck_cli.load.torch_file import read_torch_file

    budget = budget if budget is not None else memory_budget()
    total = sum(require_regular_file(file, CheckpointError, "weights file") for file in files)
    if total > budget.max_bytes:
        raise CheckpointError(
            f"the weight files in {path} hold {format_bytes(total)} ({len(files)} file(s)), over {budget.limit()}; "
            f"{raise_hint()}"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.name.endswith(".safetensors"):
            part: Any = read_safetensors(file, budget)
        else:
            part = read_torch_file(file, trust=trust, what="weights file", budget=budget)
            if not isinstance(part, Mapping) or (part and not is_state_dict(part)):
                raise CheckpointError(f"{file} holds a {type(part).__name__}, not a dict of named tensors")
        state.update(part)
    if not state:
        raise CheckpointError(f"the weight files in {path} hold no tensors")
    absent = [k for k in listed or () if k not in state]
    if absent:
        raise CheckpointError(
            f"the shard index in {path} lists {len(absent)} tensor(s) that its shards do not hold (first: "
            f"{absent[0]}, in {(listed or {})[absent[0]]}); was a shard replaced or written incompletely?"
        )
    return state


# --------------------------------------------------------------------------- fitting the tensors


Renamer = Callable[[str], tuple[str, bool]]
"""A checkpoint key → the name transformers' load-time renaming gives it, and whether it needs a tensor conversion."""


def layout_renamer(model: Any) -> Renamer | None:
    """transformers 5's load-time key renaming for ``model`` (ViT's ``encoder.layer.N.attention.attention.query``
    → ``layers.N.attention.q_proj``, ...), which ``save_pretrained`` reverts on save; None where there is none.

    Only renamings are applied. Conversions that merge or split tensors (fused MoE experts) are detected
    and reported, not run.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: checkpoints are stored in the model's own layout
        return None
    try:
        transforms = list(get_model_conversion_mapping(model))
        renamings: list[Any] = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters: list[Any] = [t for t in transforms if isinstance(t, WeightConverter)]
        rename_source_key("probe.weight", renamings, converters)
    except Exception:  # an internal API of another transformers version: load the keys as stored
        return None

    def rename(key: str) -> tuple[str, bool]:
        renamed, converter = rename_source_key(key, renamings, converters)
        return str(renamed), converter is not None

    return rename


def fit_state(model: nn.Module, state: Mapping[str, torch.Tensor], renamer: Renamer | None = None) -> Fit:
    """Rename the checkpoint's keys to the model's (layout renames, base-model prefix) and sort out the rest."""
    own = model.state_dict(keep_vars=True)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    fit = Fit(state={})
    for key, tensor in state.items():
        target, renamed, prefixed = _target_key(key, own, prefix, renamer, fit)
        if target in fit.state:
            raise CheckpointError(f"two stored tensors go to {target} of {type(model).__name__} (one is {key})")
        fit.stripped_prefix += prefixed == "stripped"
        fit.added_prefix += prefixed == "added"
        if renamed:
            fit.renamed.append(key)
        fit.state[target] = tensor
    unexpected = [k for k in fit.state if k not in own]
    recomputed = {name for name, _ in model.named_buffers()} - set(own)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    for key in unexpected:
        if key in recomputed or any(p.search(key) for p in ignore):
            fit.dropped_buffers.append(key)
            del fit.state[key]
        elif fit.stripped_prefix and not key.startswith(f"{prefix}."):
            fit.dropped_head.append(key)
            del fit.state[key]
    by_identity: dict[int, list[str]] = {}
    for key, value in own.items():
        by_identity.setdefault(id(value), []).append(key)
    buffers = dict(model.named_buffers())
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    for key, value in own.items():
        if key in fit.state:
            continue
        source = next((k for k in by_identity[id(value)] if k in fit.state), None)
        if source is not None:
            fit.tied[key] = source
        elif key in buffers and (
            not (value.is_floating_point() or value.is_complex()) or any(p.search(key) for p in ignore_missing)
        ):
            fit.own_buffers.append(key)
    return fit


def _target_key(
    key: str, own: Mapping[str, object], prefix: str, renamer: Renamer | None, fit: Fit
) -> tuple[str, bool, str | None]:
    """The model's name for a checkpoint key; whether it was renamed; the prefix ``stripped``/``added`` (or None).

    A key that only a tensor conversion would place is recorded in ``fit.needs_conversion``.
    """
    candidates = [key]
    if renamer is not None:
        new_name, needs_conversion = renamer(key)
        if needs_conversion:
            fit.needs_conversion.append(key)
        else:
            candidates.append(new_name)
    for old, new in LEGACY_RENAMES:
        if old in key:
            candidates.append(key.replace(old, new))
    for candidate in candidates:
        renamed = candidate != key
        if candidate in own:
            return candidate, renamed, None
        if prefix and candidate.startswith(f"{prefix}.") and candidate[len(prefix) + 1 :] in own:
            return candidate[len(prefix) + 1 :], renamed, "stripped"
        if prefix and f"{prefix}.{candidate}" in own:
            return f"{prefix}.{candidate}", renamed, "added"
    return key, False, None


def check_ties(model: nn.Module, fit: Fit, path: Path) -> None:
    """Tensors the model ties (one parameter under two names) must hold the same values in the checkpoint."""
    groups: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in fit.state:
            groups.setdefault(id(value), []).append(key)
    for keys in groups.values():
        first = fit.state[keys[0]]
        for other in keys[1:]:
            tensor = fit.state[other]
            if tensor.shape != first.shape or not torch.equal(tensor.to(first.dtype), first):
                raise CheckpointError(
                    f"{type(model).__name__} ties {other} to {keys[0]}, but {path} holds different values for them; "
                    'it was saved untied: set "tie_word_embeddings": false in config.json'
                )


def mismatch_hint(model: nn.Module, fit: Fit, transformers: Any) -> str:
    """Why the weights may not fit, when we can tell."""
    name = type(model).__name__
    prefix = getattr(model, "base_model_prefix", "")
    if fit.added_prefix and not fit.stripped_prefix:
        return (
            f"; the weights are the base model's (keys without {prefix!r}.), without the task head of {name}: "
            "from_pretrained would initialise that head randomly, gradcheck refuses to measure a random head "
            '(put the base class in "architectures" in config.json, or save the whole task model)'
        )
    if fit.needs_conversion:
        version = getattr(transformers, "__version__", "?")
        return (
            f"; transformers {version} merges or splits {len(fit.needs_conversion)} of these stored tensors at load "
            f"time (first: {fit.needs_conversion[0]}), a conversion gradcheck does not run"
        )
    return "; does config.json describe the model these weights were saved from?"


def fit_notes(fit: Fit, name: str) -> list[str]:
    notes = []
    if fit.tied:
        notes.append("tied, not stored: " + _listed(f"{k} = {v}" for k, v in fit.tied.items()))
    if fit.stripped_prefix:
        notes.append(f"stripped the base-model prefix from {fit.stripped_prefix} key(s) (a task model's checkpoint)")
    if fit.dropped_head:
        notes.append(
            f"ignored {len(fit.dropped_head)} tensor(s) of the task head {name} lacks: {_listed(fit.dropped_head)}"
        )
    if fit.renamed:
        notes.append(f"renamed {len(fit.renamed)} stored key(s) as from_pretrained does: {_listed(fit.renamed)}")
    if fit.dropped_buffers:
        notes.append(f"ignored stored buffers the model recomputes: {_listed(fit.dropped_buffers)}")
    if fit.own_buffers:
        notes.append(f"index buffers not stored, built from the config: {_listed(fit.own_buffers)}")
    return notes


def _listed(items: Any) -> str:
    values = list(items)
    shown = ", ".join(values[:MAX_LISTED])
    return shown + (f" and {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")


def stored_float_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
