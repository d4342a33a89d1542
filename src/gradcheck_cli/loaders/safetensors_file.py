"""``.safetensors`` files: tensors only by construction; the architecture comes from ``--model``."""

from __future__ import annotations

from pathlib import Path

import torch

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.loaders.loaded import LoadedModel
from gradcheck_cli.loaders.weights import with_architecture


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file: {first_line(exc)}") from None


def load_safetensors_file(path: Path, *, model_spec: str | None) -> LoadedModel:
    """Load a safetensors file into the ``--model`` architecture."""
    state = read_safetensors(path)
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return with_architecture(state, path, model_spec, "safetensors")
