"""Hugging Face ``save_pretrained`` directories: a model built from ``config.json``, weights read by us.

transformers only builds the architecture (``AutoConfig`` + the class named in ``architectures``);
it never opens a weights file: safetensors are read with :mod:`safetensors`, ``pytorch_model.bin``
with the tensors-only ``torch.load`` of :func:`~gradcheck_cli.load.torch_file.read_torch_file`
(full unpickling only with ``--trust``), and the tensors go in with ``load_state_dict``.

Rules, stricter than ``from_pretrained``, because the report must describe the checkpoint's model:

- A tensor the model needs but the directory lacks is accepted only when it is tied to one that was
  loaded (``lm_head.weight`` sharing ``transformer.wte.weight``) or is an integer buffer the model
  builds from its config (``position_ids``, ``token_type_ids``); anything else is refused, where
  ``from_pretrained`` would initialise it randomly with a warning.
- Stored buffers the model recomputes (non-persistent buffers, the class's
  ``_keys_to_ignore_on_load_unexpected``) are ignored; any other unexpected tensor is refused.
- The base-model prefix is handled like ``from_pretrained``: a task model's checkpoint
  (``bert.…`` + ``classifier.…``) loads into the base model, its head ignored (and said so); a base
  model's checkpoint (no ``bert.``) loaded into a task model would leave the head random, so it is
  refused with a line that says why.
- Code shipped in the directory (``auto_map``, ``trust_remote_code``) is never run, not even with
  ``--trust``: ``--trust`` allows unpickling a file the user names, not importing the ``.py`` files
  next to it. A custom model is checked by building it in the user's code and passing its weights file
  with ``--model module:factory``. A config with ``auto_map`` whose ``model_type`` and architecture
  transformers has built in uses the built-in class, as ``from_pretrained(trust_remote_code=False)``
  does.
- Checkpoints that transformers converts at load time (the fused MoE experts of transformers 5, for
  instance) are loaded as stored; when they do not fit, the error says that a conversion exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.hf_build import build, import_transformers, model_class, model_class_or_none, quiet
from gradcheck_cli.load.hf_size import check_architecture
from gradcheck_cli.load.hf_weights import (
    check_ties,
    dtype_name,
    fit_notes,
    fit_state,
    layout_renamer,
    mismatch_hint,
    read_json,
    read_weights,
    stored_float_dtype,
    weight_files,
)
from gradcheck_cli.load.limits import MemoryBudget, memory_budget, refuse_special_members
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.weights import describe_mismatch


def load_hf_directory(path: Path, *, trust: bool, budget: MemoryBudget | None = None) -> LoadedModel:
    """Build the model ``config.json`` describes and load the directory's weights into it.

    Raises :class:`CheckpointError` with one line when transformers is missing, the config needs
    custom code or is unknown to transformers, there are no weights, they do not fit, or the weight
    files or the architecture (sized on the meta device before it is built) exceed ``budget`` (the
    process-wide one by default).
    """
    budget = budget if budget is not None else memory_budget()
    refuse_special_members(path, CheckpointError)
    raw = _read_config_json(path)
    files, source, skipped, listed = weight_files(path)
    transformers = import_transformers(path)
    notes: list[str] = []
    with quiet(transformers):
        _refuse_unsupported(path, raw, transformers, notes)
        config = _read_config(path, transformers)
        cls = model_class(path, config, transformers)
        state = read_weights(files, path, listed, trust=trust, budget=budget)
        check_architecture(path, cls, config, transformers, state, budget)
        model = build(path, cls, config, transformers)
        fit = fit_state(model, state, layout_renamer(model))
        check_ties(model, fit, path)
        problem = describe_mismatch(model, fit.state, set(fit.tied) | set(fit.own_buffers))
        if problem:
            raise CheckpointError(
                f"the weights in {path} do not fit {type(model).__name__} built from its config.json: {problem}"
                f"{mismatch_hint(model, fit, transformers)}"
            )
        model.load_state_dict(fit.state, strict=False)
        tie_weights = getattr(model, "tie_weights", None)
        if callable(tie_weights):
            tie_weights()
    name = type(model).__name__
    version = getattr(transformers, "__version__", "?")
    model_type = getattr(config, "model_type", "?")
    notes.insert(0, f"{name} built from config.json (model_type {model_type}, transformers {version})")
    if cls is None:
        notes.append("config.json names no architecture: the base model was built (AutoModel.from_config)")
    notes.append(f"weights read by gradcheck from {source}" + (f" ({skipped} not read)" if skipped else ""))
    notes.extend(fit_notes(fit, name))
    stored = stored_float_dtype(state)
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if stored is not None and own is not None and stored != own:
        notes.append(f"weights stored as {dtype_name(stored)}, measured in {dtype_name(own)}")
    return LoadedModel(model, "huggingface", tuple(notes))


# --------------------------------------------------------------------------- config and class


def _read_config_json(path: Path) -> dict[str, Any]:
    """``config.json`` as JSON, read by us first: custom code and quantisation are refused before transformers."""
    config_path = path / "config.json"
    raw = read_json(config_path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(raw).__name__}, not a model config object")
    return raw


def _refuse_unsupported(path: Path, raw: Mapping[str, Any], transformers: Any, notes: list[str]) -> None:
    """Custom code (``auto_map``) transformers does not have built in, quantised weights, unknown model types."""
    architecture = _architecture(raw)
    model_type = raw.get("model_type")
    known_type = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
    known_class = architecture is None or model_class_or_none(transformers, architecture) is not None
    auto_map = raw.get("auto_map")
    if auto_map:
        custom = _custom_class(auto_map, architecture)
        if not (known_type and known_class):
            raise CheckpointError(
                f"{path} needs custom model code ({custom}, via auto_map in config.json); gradcheck never runs code "
                "from a model directory, not even with --trust: build the model in your own code and pass the weights "
                "file with --model module:factory"
            )
        notes.append(
            f"config.json's auto_map ({custom}) not used: transformers' built-in {architecture or model_type} was "
            "built instead, as from_pretrained(trust_remote_code=False) does"
        )
    quantization = raw.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, Mapping) else "?"
        raise CheckpointError(
            f"{path} holds a quantized model (quantization_config, method {method}); gradcheck measures "
            "full-precision weights only: dequantize and save_pretrained it first"
        )
    if isinstance(model_type, str) and not known_type:
        version = getattr(transformers, "__version__", "?")
        raise CheckpointError(
            f"{path}/config.json has model_type {model_type!r}, which transformers {version} does not know; "
            "upgrade transformers (pip install -U transformers) or fix model_type"
        )


def _architecture(raw: Mapping[str, Any]) -> str | None:
    architectures = raw.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return None


def _custom_class(auto_map: Any, architecture: str | None) -> str:
    """The custom class a config's ``auto_map`` points at, in words (``MyModel from modeling_my.py``)."""
    entries = auto_map.items() if isinstance(auto_map, Mapping) else []
    targets = [(k, v) for k, v in entries if isinstance(k, str) and isinstance(v, str)]
    models = [(k, v) for k, v in targets if k.startswith("AutoModel")]
    chosen = next((t for t in models if architecture and t[1].endswith(f".{architecture}")), None)
    chosen = chosen or next(iter(models), None) or next(iter(targets), None)
    if chosen is None:
        return architecture or "a custom class"
    reference = chosen[1].split("--")[-1]
    module, _, class_name = reference.rpartition(".")
    return f"{class_name} from {module}.py" if module else class_name


def _read_config(path: Path, transformers: Any) -> Any:
    """The config object, read locally: no network, no remote code."""
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, TypeError for bad configs
        version = getattr(transformers, "__version__", "?")
        raise CheckpointError(f"transformers {version} cannot read {path}/config.json: {first_line(exc)}") from None
