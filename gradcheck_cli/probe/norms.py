"""Gradient norms reduced on the device, without a host sync."""

from __future__ import annotations

import torch


def norm_and_max_abs(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 norm and max |element| as 0-dim device tensors, without a sync.

    ``aminmax`` propagates NaN and costs about as much as the norm, where ``ord=inf`` would
    first materialise ``abs()``. A NaN or Inf element makes the max non-finite; an L2 norm
    that overflows float32 while the max stays finite means a huge but finite gradient.
    """
    if tensor.is_sparse:  # nn.Embedding(sparse=True): the stored values are the gradient's non-zeros
        tensor = tensor.coalesce().values()
    if tensor.numel() == 0:
        zero = tensor.new_zeros((), dtype=torch.float32)
        return zero, zero
    low, high = torch.aminmax(tensor)
    return torch.linalg.vector_norm(tensor), torch.maximum(high, low.neg())
