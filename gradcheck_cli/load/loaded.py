"""What every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gradcheck_cli.load.batch import Batch


@dataclass(frozen=True)
class LoadedModel:
    """A module ready to probe, the kind of file it came from, and what the loader had to do."""

    module: nn.Module
    kind: str
    """``pickled_module``, ``state_dict``, ``training_checkpoint``, ``torchscript``, ``exported_program``,
    ``safetensors``, ``huggingface`` or ``dcp``."""
    notes: tuple[str, ...] = ()
    """What the loader had to do or could not do, in plain words (carried into the report)."""
    example_batch: Batch | None = None
    """A batch stored with the checkpoint (a ``.pt2`` file's example inputs), used when there is no --input."""
    trained: str | None = None
    """Why the checkpoint is known to come from training (optimizer state, a step count), else None."""
