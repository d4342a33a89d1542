"""``.safetensors`` files: tensors only by construction; the architecture comes from ``--model``."""

from __future__ import annotations

from pathlib import Path

import torch

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.limits import MemoryBudget, format_bytes, memory_budget, require_regular_file
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.sizes import raise_hint
from gradcheck_cli.load.weights import Weights, with_architecture


def read_safetensors(path: Path, budget: MemoryBudget | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU.

    safetensors checks that every tensor lies inside the file, so the file's size bounds what loading
    allocates; that size is checked against ``budget`` (the process-wide one by default) first.
    """
    from safetensors.torch import load_file

    budget = budget if budget is not None else memory_budget()
    size = require_regular_file(path, CheckpointError, "safetensors file")
    if size > budget.max_bytes:
        raise CheckpointError(
            f"safetensors file {path} holds {format_bytes(size)} of tensors, over {budget.limit()}; {raise_hint()}"
        )
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors file: {first_line(exc)}") from None


def load_safetensors_file(
    path: Path, *, model_spec: str | None, budget: MemoryBudget | None = None, strict: bool = True
) -> LoadedModel:
    """Load a safetensors file into the ``--model`` architecture (``strict`` as in ``load_state_dict``)."""
    state = read_safetensors(path, budget)
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    return with_architecture([Weights(state)], path, model_spec, "safetensors", strict=strict)
