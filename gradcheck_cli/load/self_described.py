"""Checkpoints that say what architecture they hold: a Hugging Face config saved beside the weights.

``torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()})`` names its architecture
(``model_type`` and ``architectures``). transformers builds it from that dict alone: a class of the installed
transformers, never code from the file (no ``auto_map``, no remote code), so no ``--model`` is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.hf_build import build, import_transformers, model_class


def hf_config_entry(content: Mapping[Any, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """The entry holding a Hugging Face config as a dict (it has a string ``model_type``), or None."""
    for key, value in content.items():
        if isinstance(value, Mapping) and isinstance(value.get("model_type"), str):
            return str(key), value
    return None


_HEADS = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForImageClassification",
)
"""Tried in turn when the config names no ``architectures`` (``config.to_dict()`` of a fresh config)."""


def model_from_hf_config(key: str, raw: Mapping[str, Any], path: Path, keys: set[str]) -> tuple[nn.Module, str]:
    """The architecture the config names, freshly initialised, and the report's note saying so. Without
    ``architectures``, the model with a standard head whose parameter names best match ``keys``."""
    if raw.get("auto_map"):
        raise CheckpointError(
            f"{path}: the Hugging Face config in {key!r} names custom code (auto_map), which gradcheck never runs; "
            "name the architecture with --model"
        )
    transformers = import_transformers(path)
    settings = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        config = transformers.AutoConfig.for_model(str(raw["model_type"]), **settings)
    except Exception as exc:  # an unknown model_type or an inconsistent config
        raise CheckpointError(f"{path}: transformers cannot read the config in {key!r}: {first_line(exc)}") from None
    cls = model_class(path, config, transformers)
    model = build(path, cls, config, transformers) if cls is not None else _best_head(config, transformers, keys)
    if model is None:
        raise CheckpointError(f"{path}: transformers builds no model from the config in {key!r}; use --model")
    return model, f"architecture {type(model).__name__} built from the checkpoint's Hugging Face config ({key!r})"


def _best_head(config: Any, transformers: Any, keys: set[str]) -> nn.Module | None:
    """Of the standard heads transformers can build for this config, the one whose keys overlap ``keys`` most."""
    best: tuple[int, nn.Module | None] = (-1, None)
    for name in _HEADS:
        try:
            model = getattr(transformers, name).from_config(config, trust_remote_code=False)
        except Exception:  # this model type has no such head
            continue
        overlap = len(keys & set(model.state_dict()))
        if overlap > best[0]:
            best = (overlap, model)
        if overlap == len(keys):
            break
    return best[1]


def lightning_class_path(content: Mapping[Any, Any]) -> str | None:
    """The class a LightningCLI checkpoint names (``hyper_parameters["_class_path"]``) as ``module:Class``."""
    hyper = content.get("hyper_parameters")
    path = hyper.get("_class_path") if isinstance(hyper, Mapping) else None
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    return f"{module}:{name}"


def hyper_parameters(content: Mapping[Any, Any]) -> Mapping[str, Any] | None:
    """A Lightning checkpoint's constructor arguments (``save_hyperparameters()``), when they are a dict."""
    hyper = content.get("hyper_parameters")
    return hyper if isinstance(hyper, Mapping) and all(isinstance(k, str) for k in hyper) else None


def named_class_spec(content: Mapping[Any, Any], path: Path, trust: bool) -> tuple[str, str] | None:
    """``--model`` as the checkpoint itself names it (LightningCLI) and the note saying so; importing a class a
    file names runs code, so without ``trust`` the one-line error gives the command that allows it."""
    spec = lightning_class_path(content)
    if spec is None:
        return None
    if not trust:
        raise CheckpointError(
            f"{path} names its model class {spec.replace(':', '.')} (LightningCLI hyper_parameters); importing it "
            f"runs that code: if you trust the checkpoint, run from your project root: gradcheck inspect {path} "
            f"--trust, or name the class yourself: --model {spec}"
        )
    return spec, f"architecture {spec.replace(':', '.')} named by the checkpoint's hyper_parameters (--trust)"
