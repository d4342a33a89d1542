"""An independent copy of a user's model, for work that must never touch the original."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """A copy sharing no tensor with ``model``.

    TorchScript modules go through ``torch.jit.save``/``load``: their ``deepcopy`` clones parameters into
    non-leaf tensors whose backward writes ``.grad`` into the *original's* parameters. Anything a module's
    ``__deepcopy__``/``__reduce__`` raises propagates to the caller, who words it.
    """
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        loaded: nn.Module = torch.jit.load(buffer, map_location=device)
        return loaded
    return copy.deepcopy(model)
