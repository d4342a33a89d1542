"""What gradcheck needs to know of a module before hooking it: the eager module inside a wrapper, which modules
own parameters, what users call them, and whether module hooks can fire on it."""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module inside DataParallel/DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def parametrised_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, as ``named_modules()`` names them."""
    return [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


def supports_module_hooks(model: nn.Module) -> bool:
    """Module hooks never fire on TorchScript modules, nor on a ``torch.export`` program's flat graph."""
    if isinstance(model, torch.jit.ScriptModule):
        return False
    if isinstance(model, torch.fx.GraphModule):
        # an exported program may call one guard submodule; its layers are never call_module targets
        return any(node.op == "call_module" and node.target != "_guards_fn" for node in model.graph.nodes)
    return True


def module_type(module: nn.Module) -> str:
    """The class name users wrote (TorchScript keeps it as ``original_name``)."""
    return str(getattr(module, "original_name", None) or type(module).__name__)
