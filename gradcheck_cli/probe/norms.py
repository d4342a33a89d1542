"""Gradient norms reduced on the device, without a host sync."""

from __future__ import annotations

from collections.abc import Sequence

import torch

HALF = (torch.float16, torch.bfloat16)
"""Half-precision gradients are normed in float32 (:func:`norm_and_max_abs`)."""


def norm_and_max_abs(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm and max |element| as 0-dim device tensors, without a sync.

    ``aminmax`` propagates NaN and costs about as much as the norm, where ``ord=inf`` is a scalar loop on a
    CPU (17× slower) and on older versions materialised ``abs()``. A NaN or Inf element makes the max
    non-finite; an L2 norm that overflows float32 while the max stays finite means a huge but finite gradient.
    """
    if tensor.is_sparse:  # nn.Embedding(sparse=True): the stored values are the gradient's non-zeros
        tensor = tensor.coalesce().values()
    if tensor.numel() == 0:
        zero = tensor.new_zeros((), dtype=torch.float32)
        return zero, zero
    low, high = torch.aminmax(tensor)
    # an fp16 gradient's norm is returned in float32: as fp16 it reads inf beyond 65504 although every element
    # is finite (a million elements of 300: 3e5)
    wide = torch.float32 if tensor.dtype in HALF else None
    return torch.linalg.vector_norm(tensor, dtype=wide), torch.maximum(high, low.neg())


def norms_and_max_abs(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`norm_and_max_abs` of every tensor, the same values with fewer calls: the L2 norms of the dense
    non-empty float32/float64 ones in one ``_foreach_norm``, their maxima from one ``aminmax`` each, combined at
    once (half-precision ones one by one, normed in float32)."""
    dense = [i for i, t in enumerate(tensors) if not t.is_sparse and t.numel() and t.dtype not in HALF]
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if dense and len({tensors[i].device for i in dense}) == 1:
        group = [tensors[i] for i in dense]
        extremes = [torch.aminmax(t) for t in group]
        lows = torch.stack([low for low, _ in extremes])  # mixed dtypes widen exactly to the widest
        highs = torch.stack([high for _, high in extremes])
        peaks = torch.maximum(highs, lows.neg()).unbind()
        found = dict(zip(dense, zip(torch._foreach_norm(group), peaks, strict=True), strict=True))
    return [found[i] if i in found else norm_and_max_abs(t) for i, t in enumerate(tensors)]
