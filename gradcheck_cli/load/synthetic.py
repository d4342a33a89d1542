"""Batches made up from the model itself, when the user gives no ``--input``."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import BatchError
from gradcheck_cli.load.batch import Batch, describe_value
from gradcheck_cli.probe.modules import first_layer, module_type

BATCH = 8
SEQUENCE = 16
IMAGE = 32
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` (or ``8x3x32x32``) → ``(8, 3, 32, 32)``."""
    parts = re.split(r"[,x×]", text.replace(" ", ""))
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BatchError(f"--input-shape {text!r} must be comma-separated positive integers, e.g. 8,3,32,32") from None
    if not shape or any(s <= 0 for s in shape):
        raise BatchError(f"--input-shape {text!r} must be comma-separated positive integers, e.g. 8,3,32,32")
    return shape


def shaped_batch(model: nn.Module, shape: tuple[int, ...], dtype_name: str | None, seed: int) -> tuple[Batch, str]:
    """A random batch of the shape the user gave: floats ~ N(0, 1), integers below the vocabulary size."""
    name = (dtype_name or "float32").lower().removeprefix("torch.")
    if name not in DTYPES:
        raise BatchError(f"--input-dtype {dtype_name!r} is not one of: {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    generator = torch.Generator().manual_seed(seed + 1)
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=generator).to(dtype)
    else:
        x = torch.randint(0, _vocabulary(model), shape, generator=generator, dtype=dtype)
    main = _hf_main_input(model)
    batch = Batch(kwargs={main: x}) if main else Batch(args=(x,))
    return batch, f"random {describe_value(x)} from --input-shape"


def inferred_batch(model: nn.Module, seed: int) -> tuple[Batch, str]:
    """A small random batch that fits the model's first layer (or a Hugging Face config)."""
    generator = torch.Generator().manual_seed(seed + 1)
    hf = _hf_batch(model, generator)
    if hf is not None:
        return hf
    first = first_layer(model)
    if first is None:
        raise BatchError("cannot infer a batch for this model; pass --input BATCH or --input-shape 8,3,32,32")
    name, module = first
    kind = module_type(module)
    x = _input_for(module, kind, generator)
    if x is None:
        raise BatchError(
            f"cannot infer a batch from the first layer {name} ({kind}); pass --input BATCH or --input-shape"
        )
    return Batch(args=(x,)), f"random {describe_value(x)} inferred from the first layer {name} ({kind})"


def _input_for(module: nn.Module, kind: str, generator: torch.Generator) -> torch.Tensor | None:
    batch_first = bool(getattr(module, "batch_first", False))
    if kind in ("Embedding", "EmbeddingBag"):
        return torch.randint(0, _int_attr(module, "num_embeddings"), (BATCH, SEQUENCE), generator=generator)
    if kind == "Linear":
        return torch.randn(BATCH, _int_attr(module, "in_features"), generator=generator)
    if kind.startswith("Conv") and kind[-2:] in ("1d", "2d", "3d"):
        spatial = (IMAGE,) * int(kind[-2])
        return torch.randn(BATCH, _int_attr(module, "in_channels"), *spatial, generator=generator)
    if kind in ("RNN", "LSTM", "GRU"):
        size = _int_attr(module, "input_size")
        shape = (BATCH, SEQUENCE, size) if batch_first else (SEQUENCE, BATCH, size)
        return torch.randn(shape, generator=generator)
    if kind == "MultiheadAttention":
        size = _int_attr(module, "embed_dim")
        shape = (BATCH, SEQUENCE, size) if batch_first else (SEQUENCE, BATCH, size)
        return torch.randn(shape, generator=generator)
    return None


def _int_attr(module: nn.Module, name: str) -> int:
    value = getattr(module, name)
    assert isinstance(value, int), f"{module_type(module)}.{name} is {value!r}"
    return value


def _vocabulary(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    for module in model.modules():
        if module_type(module) == "Embedding":
            return _int_attr(module, "num_embeddings")
    return 2


def _hf_main_input(model: nn.Module) -> str | None:
    name = getattr(model, "main_input_name", None)
    return name if isinstance(name, str) and getattr(model, "config", None) is not None else None


def _hf_batch(model: nn.Module, generator: torch.Generator) -> tuple[Batch, str] | None:
    """A batch from a Hugging Face model's config: token ids below the vocabulary, or images of its size."""
    main = _hf_main_input(model)
    if main is None:
        return None
    config: Any = model.config
    kwargs: dict[str, torch.Tensor] = {}
    if main == "input_ids":
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        length = min(SEQUENCE, int(limit)) if isinstance(limit, int) else SEQUENCE
        ids = torch.randint(0, _vocabulary(model), (2, length), generator=generator)
        kwargs["input_ids"] = ids
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids
    elif main == "pixel_values":
        size = getattr(config, "image_size", None) or 64
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        channels = int(getattr(config, "num_channels", 3) or 3)
        kwargs["pixel_values"] = torch.randn(2, channels, height, width, generator=generator)
    elif main == "input_values":
        kwargs["input_values"] = torch.randn(2, 16000, generator=generator)
    else:
        return None
    described = ", ".join(f"{k}={describe_value(v)}" for k, v in kwargs.items())
    return Batch(kwargs=kwargs), f"random {described} inferred from the Hugging Face config"
