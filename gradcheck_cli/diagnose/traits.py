"""What the advice needs to know about a model's structure: activations, norms, cells, init scale."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradcheck_cli.diagnose.module_kinds import GATED_RECURRENT, PLAIN_RECURRENT, RELU_LIKE, SATURATING
from gradcheck_cli.probe.modules import module_type

NORMS = {
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "LayerNorm",
    "GroupNorm",
    "RMSNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
}


@dataclass(frozen=True)
class InitScale:
    """A weight's standard deviation beside the Xavier and Kaiming (ReLU) scales for its fans."""

    layer: str
    std: float
    xavier: float
    kaiming: float


@dataclass(frozen=True)
class ModelTraits:
    """Structural facts about a model, gathered once from its modules."""

    activations: frozenset[str]
    norms: frozenset[str]
    recurrent: frozenset[str]
    init: tuple[InitScale, ...]
    half_precision: bool

    @property
    def relu_like(self) -> bool:
        """Whether any ReLU-family activation module is present."""
        return bool(self.activations & RELU_LIKE)

    @property
    def saturating(self) -> frozenset[str]:
        """The sigmoid/tanh-like activation modules present."""
        return self.activations & SATURATING


def model_traits(model: nn.Module, stds: Mapping[str, float] | None = None) -> ModelTraits:
    """Collect the traits of ``model`` without running it. ``stds``: weights' standard deviations already measured
    (the init audit's, by module name), which are not measured again."""
    known = stds or {}
    types = {name: module_type(m) for name, m in model.named_modules()}
    kinds = set(types.values())
    recurrent = set(kinds & (PLAIN_RECURRENT | GATED_RECURRENT))
    for module in model.modules():
        if isinstance(module, nn.RNN) or module_type(module) == "RNN":
            recurrent.add("RNN")
    weights: list[tuple[str, int, int, torch.Tensor | None]] = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if types[name] in {"Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D"} and isinstance(weight, torch.Tensor):
            found = _fans_and_sample(types[name], weight.detach(), measured=name in known)
            if found is not None:
                weights.append((name, *found))
    init = _init_scales(weights, known)
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return ModelTraits(
        activations=frozenset(kinds & (RELU_LIKE | SATURATING)),
        norms=frozenset(kinds & NORMS),
        recurrent=frozenset(recurrent),
        init=tuple(init),
        half_precision=half,
    )


def _fans_and_sample(kind: str, weight: torch.Tensor, measured: bool) -> tuple[int, int, torch.Tensor | None] | None:
    """(fan in, fan out, at most 2^16 evenly strided entries as float32 unless its std was ``measured``) of a
    weight; None when it has no scale."""
    if weight.dim() < 2 or weight.numel() < 2 or not weight.is_floating_point():
        return None
    if kind == "Conv1D":  # Hugging Face GPT-2 stores (in, out)
        fan_in, fan_out = weight.shape[0], weight.shape[1]
    else:
        receptive = weight[0][0].numel()
        fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    if measured:
        return fan_in, fan_out, None
    flat = weight.reshape(-1)
    return fan_in, fan_out, flat[:: -(-flat.numel() // 65536)].float()  # an i.i.d. init's scale needs no more


def _init_scales(
    weights: list[tuple[str, int, int, torch.Tensor | None]], known: Mapping[str, float]
) -> list[InitScale]:
    """Each weight's std against Xavier's and Kaiming's: ``known`` ones as given, the others' stds copied to the
    host once per device."""
    stds = {i: known[name] for i, (name, *_, sample) in enumerate(weights) if sample is None}
    sampled = [(i, sample) for i, (*_, sample) in enumerate(weights) if sample is not None]
    for device in {sample.device for _, sample in sampled}:
        members = [(i, sample) for i, sample in sampled if sample.device == device]
        values = torch.stack([sample.std() for _, sample in members]).tolist()
        stds.update(zip((i for i, _ in members), values, strict=True))
    return [
        InitScale(name, stds[i], math.sqrt(2.0 / (fan_in + fan_out)), math.sqrt(2.0 / fan_in))
        for i, (name, fan_in, fan_out, _) in enumerate(weights)
        if math.isfinite(stds[i])
    ]
