"""The fixes that change a model's structure: a normalisation after each hidden layer, or pre-norm residual
blocks, inserted into plain ``nn.Sequential`` modules (the only place they fit without rewriting forward code).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from gradcheck_cli.advise.fix_targets import WEIGHT_LAYERS, NotApplicable, WeightLayer, count
from gradcheck_cli.diagnose.following import is_activation
from gradcheck_cli.diagnose.traits import NORMS
from gradcheck_cli.probe.modules import module_type

BLOCK_INNER = NORMS | {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
"""Modules between a Linear/Conv and its activation that the residual fix keeps inside the block."""


def _is_activation(module: nn.Module) -> bool:
    return is_activation(module_type(module))


class BatchNormLastDim(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the last dimension, for Linear outputs of any rank (``(N, C)``, ``(N, L, C)``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 2:
            return super().forward(input)
        flat = super().forward(input.reshape(-1, input.shape[-1]))
        return flat.reshape(input.shape)


class Residual(nn.Module):
    """``x + f(norm(x))``: the pre-norm shortcut the ``residual`` fix puts around a shape-preserving block."""

    def __init__(self, norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(self.norm(x))


def _plain_sequentials(model: nn.Module) -> list[nn.Sequential]:
    """``nn.Sequential`` modules whose forward is Sequential's own (a subclass may do anything)."""
    return [m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]


def _rebuild(seq: nn.Sequential, items: list[tuple[str | None, nn.Module]]) -> None:
    """Replace the contents of ``seq`` in place (its parent keeps the same object).

    Numbered children are renumbered; named ones keep their names, and a new module without a
    name gets one derived from the module before it.
    """
    numbered = all(key.isdigit() for key in seq._modules)
    seq._modules.clear()
    previous = "block"
    for index, (key, module) in enumerate(items):
        if numbered:
            key = str(index)
        elif key is None:
            key = f"{previous}_{type(module).__name__.lower()}"
        seq.add_module(key, module)
        previous = key


def _norm_for(layer: nn.Module, kind: str) -> tuple[nn.Module, str]:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(layer, nn.Linear):
        n = layer.out_features
        norm: nn.Module = BatchNormLastDim(n) if kind == "batch_norm" else nn.LayerNorm(n)
        label = f"BatchNorm1d({n})" if kind == "batch_norm" else f"LayerNorm({n})"
    else:
        assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        c = layer.out_channels
        dims = len(layer.kernel_size)
        if kind == "batch_norm":
            norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](c)
            label = f"BatchNorm{dims}d({c})"
        else:
            norm = nn.GroupNorm(1, c)
            label = f"GroupNorm(1, {c}) (LayerNorm over channels and positions)"
    return norm.to(device=weight.device, dtype=weight.dtype), label


def _insert_norms(model: nn.Module, kind: str) -> str:
    sequentials = _plain_sequentials(model)
    if not sequentials:
        raise NotApplicable(
            "the model has no nn.Sequential, so there is no place to insert a normalisation layer without "
            "changing its forward code"
        )
    inserted: Counter[str] = Counter()
    for seq in sequentials:
        children = list(seq._modules.items())
        items: list[tuple[str | None, nn.Module]] = []
        for index, (key, child) in enumerate(children):
            assert child is not None
            items.append((key, child))
            nxt = children[index + 1][1] if index + 1 < len(children) else None
            if isinstance(child, WEIGHT_LAYERS) and nxt is not None and (_is_activation(nxt) or _is_weight(nxt)):
                norm, label = _norm_for(child, kind)
                items.append((None, norm))
                inserted[label.split("(")[0]] += 1
        if len(items) != len(children):
            _rebuild(seq, items)
    if not inserted:
        raise NotApplicable(
            "no Linear/Conv layer inside an nn.Sequential is directly followed by an activation module or another "
            "Linear/Conv layer, so there is no hidden layer to normalise"
        )
    what = ", ".join(f"{n} {label}" for label, n in inserted.most_common())
    return (
        f"inserted {what} after each hidden Linear/Conv layer of an nn.Sequential (one followed by an activation "
        "or directly by another Linear/Conv; the output layer is left alone)"
    )


def _is_weight(module: nn.Module | None) -> bool:
    return isinstance(module, WEIGHT_LAYERS)


def batch_norm(model: nn.Module) -> str:
    """BatchNorm after each hidden Linear/Conv of any ``nn.Sequential``: one an activation or another layer follows."""
    return _insert_norms(model, "batch_norm")


def layer_norm(model: nn.Module) -> str:
    """LayerNorm (GroupNorm(1, C) for convolutions) after each hidden Linear/Conv of any ``nn.Sequential``."""
    return _insert_norms(model, "layer_norm")


def _keeps_shape(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return layer.in_features == layer.out_features
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if layer.in_channels != layer.out_channels or any(s != 1 for s in layer.stride):
            return False
        if layer.padding == "same":
            return True
        if isinstance(layer.padding, str):
            return False
        return all(
            p * 2 == d * (k - 1) for p, d, k in zip(layer.padding, layer.dilation, layer.kernel_size, strict=True)
        )
    return False


def _input_norm(layer: WeightLayer) -> nn.Module:
    """LayerNorm over a Linear's input features, GroupNorm(1, C) over a convolution's input channels."""
    norm: nn.Module = (
        nn.LayerNorm(layer.in_features) if isinstance(layer, nn.Linear) else nn.GroupNorm(1, layer.in_channels)
    )
    return norm.to(device=layer.weight.device, dtype=layer.weight.dtype)


def residual(model: nn.Module) -> str:
    """Wrap each shape-preserving block of an ``nn.Sequential`` into a pre-norm residual ``x + f(LayerNorm(x))``.

    A block is a Linear/Conv whose output has its input's shape (in == out features; for convolutions
    stride 1 and same padding), with the norm/dropout and activation modules that directly follow it.
    The shortcut is the advice snippet's pre-norm form: a plain ``x + f(x)`` around the existing
    weights grows the gradient by about √(1 + gain²) per block (a 50-layer ReLU net with Xavier
    weights goes from vanishing to exploding, 1e7), while the norm keeps each branch at unit scale.
    """
    sequentials = _plain_sequentials(model)
    if not sequentials:
        raise NotApplicable(
            "the model has no nn.Sequential, so a shortcut cannot be added without changing its forward code"
        )
    wrapped = 0
    for seq in sequentials:
        children = [(k, m) for k, m in seq._modules.items() if m is not None]
        items: list[tuple[str | None, nn.Module]] = []
        before = wrapped
        index = 0
        while index < len(children):
            key, child = children[index]
            if not (isinstance(child, WEIGHT_LAYERS) and _keeps_shape(child)):
                items.append((key, child))
                index += 1
                continue
            end = index + 1
            while end < len(children) and module_type(children[end][1]) in BLOCK_INNER:
                end += 1
            if end < len(children) and _is_activation(children[end][1]):
                end += 1
            body = nn.Sequential(*(m for _, m in children[index:end]))
            items.append((key, Residual(_input_norm(child), body)))
            wrapped += 1
            index = end
        if wrapped > before:
            _rebuild(seq, items)
    if not wrapped:
        raise NotApplicable(
            "no Linear/Conv layer inside an nn.Sequential keeps its input's shape (in == out features; for "
            "convolutions stride 1 and same padding), so x + f(x) is not defined there"
        )
    return (
        f"wrapped {count(wrapped, 'shape-preserving Linear/Conv block')} (with the norm/activation after each) of "
        "nn.Sequential into pre-norm residual blocks x + f(LayerNorm(x)) (GroupNorm(1, C) for convolutions); "
        "weights unchanged"
    )
