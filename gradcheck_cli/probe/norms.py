"""Gradient norms reduced on the device, without a host sync."""

from __future__ import annotations

from collections.abc import Sequence

import torch

HALF = (torch.float16, torch.bfloat16)
"""Half-precision gradients are normed in float32 (:func:`norm_and_max_abs`)."""

BLAS_ELEMENTS = 4096
"""From this many elements up, a CPU tensor's L2 norm is a BLAS ``dot`` (:func:`l2_norms`); below, per-call cost
dominates and one ``_foreach_norm`` over all the small ones is cheaper."""


def _blas_norm(tensor: torch.Tensor) -> bool:
    """Whether :func:`l2_norms` takes ``tensor``'s norm as √(v·v): a contiguous float32/float64 CPU tensor of at
    least ``BLAS_ELEMENTS``."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype in (torch.float32, torch.float64)
        and tensor.numel() >= BLAS_ELEMENTS
        and tensor.is_contiguous()
    )


def l2_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each dense tensor as a 0-dim device tensor, in order, without a sync.

    On a CPU a contiguous float32/float64 tensor's norm is √(v·v) through BLAS ``dot``: twice as fast as
    ``vector_norm`` here (ResNet-50's 4×256×56×56 gradient: 101 against 225 µs; 50M elements from memory 5.4
    against 8.8 ms; an MLP's 50 512×512 gradients with its 50 biases in one ``_foreach_norm``: 1.1 against 1.8 ms)
    and closer to the float64 norm (8e-6 against 6e-5 relative on that gradient), with the same overflow beyond
    float32's range. The rest, and every tensor on a GPU (one fused kernel there), go through one
    ``torch._foreach_norm``.
    """
    found: list[torch.Tensor | None] = [None] * len(tensors)
    rest = []
    for index, tensor in enumerate(tensors):
        if _blas_norm(tensor):
            flat = tensor.view(-1)
            found[index] = torch.dot(flat, flat).sqrt()
        else:
            rest.append(index)
    if rest:
        for index, norm in zip(rest, torch._foreach_norm([tensors[i] for i in rest]), strict=True):
            found[index] = norm
    return [norm for norm in found if norm is not None]


def max_abs(tensor: torch.Tensor) -> torch.Tensor:
    """max |element| as a 0-dim device tensor, NaN-propagating, in one pass and without a full-size temporary."""
    if tensor.is_sparse:
        tensor = tensor.coalesce().values()
    low, high = torch.aminmax(tensor)
    return torch.maximum(high, low.neg())


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
    return l2_norm(tensor), max_abs(tensor)


def l2_norm(tensor: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a gradient as a 0-dim device tensor, without a sync: a sparse one's stored values, 0 for an
    empty one, a half-precision one's in float32 (as fp16 it reads inf beyond 65504 although every element is
    finite: a million elements of 300 make 3e5)."""
    if tensor.is_sparse:
        tensor = tensor.coalesce().values()
    if tensor.numel() == 0:
        return tensor.new_zeros((), dtype=torch.float32)
    if tensor.dtype in HALF:
        return torch.linalg.vector_norm(tensor, dtype=torch.float32)
    return l2_norms([tensor])[0]


def _batchable(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the dense, non-empty float32/float64 tensors, reduced together when they share one device (none
    otherwise); the half-precision, sparse and empty ones take the one-by-one path."""
    dense = [i for i, t in enumerate(tensors) if not t.is_sparse and t.numel() and t.dtype not in HALF]
    return dense if len({tensors[i].device for i in dense}) == 1 else []


def gradient_norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`l2_norm` of every tensor, the batchable ones together (:func:`l2_norms`)."""
    group = _batchable(tensors)
    found = dict(zip(group, l2_norms([tensors[i] for i in group]), strict=True))
    return [found[i] if i in found else l2_norm(t) for i, t in enumerate(tensors)]


def norms_and_max_abs(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`norm_and_max_abs` of every tensor, the same values with fewer calls: the batchable ones' norms by
    :func:`l2_norms` and their maxima combined at once (half-precision and sparse ones one by one)."""
    dense = _batchable(tensors)
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if dense:
        group = [tensors[i] for i in dense]
        extremes = [torch.aminmax(t) for t in group]
        lows = torch.stack([low for low, _ in extremes])  # mixed dtypes widen exactly to the widest
        highs = torch.stack([high for _, high in extremes])
        peaks = torch.maximum(highs, lows.neg()).unbind()
        found = dict(zip(dense, zip(l2_norms(group), peaks, strict=True), strict=True))
    return [found[i] if i in found else norm_and_max_abs(t) for i, t in enumerate(tensors)]
