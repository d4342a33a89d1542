"""What gradcheck needs to know of a module before hooking it: the eager module inside a wrapper, which modules
own parameters, what users call them, whether module hooks can fire on it, and what input its first layer takes."""

from __future__ import annotations

from collections.abc import Sequence

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


def unique_params(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """Every parameter the modules own directly, once each, in module order (a tied weight counts once)."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


INPUT_ATTRIBUTES = ("in_features", "in_channels", "num_embeddings", "input_size", "embed_dim")
"""Attributes through which a layer says what input it takes (Linear, Conv, Embedding, RNN, attention)."""


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module, in definition order, that owns parameters and says what input it takes."""
    for name, module in model.named_modules():
        if _input_size(module) is not None:
            return name, module
    return None


def _input_size(module: nn.Module) -> int | None:
    for attribute in INPUT_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and next(module.parameters(recurse=False), None) is not None:
            return value
    return None


def expected_input(model: nn.Module) -> str | None:
    """What the model's first layer expects, in words (for 'the batch does not fit' errors)."""
    first = first_layer(model)
    if first is None:
        return None
    name, module = first
    kind = module_type(module)
    for attribute in INPUT_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return f"the first layer {name} ({kind}) expects {attribute}={value}"
    return None
