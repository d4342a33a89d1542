"""TorchScript archives (``torch.jit.save``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.loaders.loaded import LoadedModel


def load_torchscript(path: Path) -> LoadedModel:
    """Load a TorchScript archive; module hooks do not fire on it (the probe falls back, and says so)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 warns that TorchScript is deprecated
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"{path} looks like TorchScript but could not be loaded: {first_line(exc)}") from None
    return LoadedModel(module, "torchscript")
