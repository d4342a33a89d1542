"""``--autocast fp16`` on a CPU: CUDA's fp16 autocast emulated with float32 kernels.

A CPU has no fast float16 kernels: under ``torch.autocast("cpu", dtype=torch.float16)`` a convolution or a
matmul runs 7–11× slower than in float32 (measured on the CI box's AVX-512 CPU: a 1024² linear layer 58 → 391
ms, a 64-channel 3×3 convolution 26 → 282 ms, forward and backward), so the probe of CREPE full (22M
parameters) took 52 s instead of 5 s and the whole run 157 s. What the user asks with ``--autocast fp16`` is
what their CUDA training would see. CUDA's autocast runs the ops of its fp16 list (matmuls, convolutions,
``linear``, ``prelu``, attention) on fp16 inputs with float32 accumulation and returns fp16; other ops run in
the dtype of their inputs (fp16 in, fp16 out: ReLU, pooling, dropout, batch norm, a sum of two fp16
activations), those of its float32 list (softmax, layer norm, losses, exp, log, sum…) in float32; in backward
every fp16 tensor's gradient is fp16. This mode does the same with float32 kernels, tracking which tensors
CUDA would hold in fp16: such a tensor holds only fp16 values (rounded, |x| > 65504 → inf) and its gradient is
rounded to fp16 (below 2⁻²⁵ → 0). Measured against the CPU's real fp16 autocast on small CNNs and MLPs, the
share of gradient elements lost to zero per layer agrees (tests/test_half_emulation.py).

What it does not reproduce: model code that branches on ``tensor.dtype == torch.float16`` (T5's clamp) sees
float32; the fused ``nn.LSTM``/``nn.GRU`` kernels are rounded only at their inputs and outputs; an op whose
fp16 result CUDA computes with fp16 intermediates (rather than float32 then rounded) may differ in the last
bit. The report says the pass was emulated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

HALF_OPS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.linear,
        F.bilinear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        F.prelu,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.mv,
        torch.addmm,
        torch.addmv,
        torch.addr,
        torch.addbmm,
        torch.baddbmm,
        torch.einsum,
        torch.chain_matmul,
        torch.linalg.multi_dot,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
        torch.Tensor.mv,
        torch.Tensor.addmm,
        torch.Tensor.baddbmm,
    }
)
"""CUDA autocast's fp16 list (torch.amp docs, "CUDA Ops that can autocast to float16"), as Python callables."""


FLOAT32_OPS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.softmax, F.log_softmax, F.softmin, F.layer_norm, F.group_norm, F.normalize, F.softplus,
        F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.kl_div, F.poisson_nll_loss,
        F.binary_cross_entropy_with_logits, F.cosine_similarity, F.cosine_embedding_loss, F.margin_ranking_loss,
        F.hinge_embedding_loss, F.multilabel_margin_loss, F.multi_margin_loss, F.soft_margin_loss,
        F.triplet_margin_loss,
        torch.softmax, torch.log_softmax, torch.layer_norm, torch.group_norm, torch.exp, torch.expm1, torch.log,
        torch.log10, torch.log1p, torch.log2, torch.pow, torch.reciprocal, torch.rsqrt, torch.sum, torch.prod,
        torch.cumsum, torch.cumprod, torch.norm, torch.dist, torch.cdist, torch.acos, torch.asin, torch.cosh,
        torch.sinh, torch.tan, torch.erfinv, torch.renorm,
        torch.Tensor.softmax, torch.Tensor.log_softmax, torch.Tensor.exp, torch.Tensor.log, torch.Tensor.pow,
        torch.Tensor.__pow__, torch.Tensor.__rpow__, torch.Tensor.__rtruediv__, torch.Tensor.__rdiv__,
        torch.Tensor.reciprocal, torch.Tensor.rsqrt, torch.Tensor.sum, torch.Tensor.prod, torch.Tensor.cumsum,
        torch.Tensor.norm, torch.Tensor.log1p, torch.Tensor.expm1,
    }
)  # fmt: skip
"""CUDA autocast's float32 list: these run in float32 whatever their inputs (their outputs are float32)."""
FOLLOWS_INPUT: frozenset[Callable[..., Any]] = frozenset({F.batch_norm, F.instance_norm, torch.batch_norm})
"""fp16 input with float32 running statistics and affine parameters: fp16 output (cuDNN's batch norm)."""
CASTS = frozenset({torch.Tensor.float, torch.Tensor.to, torch.Tensor.type, torch.Tensor.double})
"""An explicit cast: its result is what the cast says (``.float()`` of an fp16 tensor is float32)."""


class _RoundToHalf(torch.autograd.Function):
    """Identity whose forward value and backward gradient are rounded to the nearest fp16 (kept float32)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return rounded(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return rounded(grad)


def rounded(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` rounded to the nearest fp16 values (inf beyond 65504, 0 below 2⁻²⁵), kept in its dtype."""
    return tensor.to(torch.float16).to(tensor.dtype)


def is_half(tensor: Any) -> bool:
    """True for a float32 tensor that CUDA's autocast would hold in fp16 (an output of the tracked ops)."""
    return isinstance(tensor, torch.Tensor) and getattr(tensor, HALF_MARK, False)


HALF_MARK = "_gradcheck_fp16"
"""The attribute that marks a float32 tensor as one that holds fp16 values (and gets fp16 gradients)."""
HOOKED = "_gradcheck_fp16_hooked"
"""The ``grad_fn`` whose gradient the rounding hook was registered for (an in-place op makes a new one)."""


def to_half_values(value: Any) -> Any:
    """An fp16-list op's input: a float32 tensor rounded to fp16 values (differentiably), unless it holds them."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and not is_half(value):
        return _RoundToHalf.apply(value)
    return value


class HalfEmulation(TorchFunctionMode):
    """Within this mode, tensors that CUDA's fp16 autocast would hold in fp16 hold fp16 values (see the module)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in HALF_OPS:
            args, kwargs = tree_map(to_half_values, (args, kwargs))
            return tree_map(_as_half, func(*args, **kwargs))
        if func in CASTS:
            return _cast(func(*args, **kwargs), args, kwargs)
        half = func not in FLOAT32_OPS and _produces_half(func, args, kwargs)
        result = func(*args, **kwargs)
        return tree_map(_as_half, result) if half else result


def _produces_half(func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """Whether CUDA would return fp16: an fp16 floating input, no explicit ``dtype``, and no float32 input tensor
    of more than one element to promote it (a 0-dim tensor or a Python number does not; batch norm's statistics
    do not)."""
    if kwargs.get("dtype") is not None:  # x.new_zeros((), dtype=torch.float32), torch.zeros_like(x, dtype=…)
        return False
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not any(is_half(t) for t in tensors):
        return False
    if func in FOLLOWS_INPUT:
        return is_half(args[0]) if args else False
    return not any(t.dtype == torch.float32 and t.dim() > 0 and not is_half(t) for t in tensors)


def _as_half(value: Any) -> Any:
    """An op's float32 output as CUDA's fp16: rounded (a new tensor) and marked, its gradient rounded to fp16 by a
    tensor hook (registered first, so every later hook sees the fp16 gradient). A view or the input itself (an
    in-place op) is only marked, and hooked again for its new version: a copy would cut it from what it aliases."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
        return value
    if not is_half(value) and value._base is None and not _mark_only(value):
        value = _RoundToHalf.apply(value)
    setattr(value, HALF_MARK, True)
    if value.requires_grad and getattr(value, HOOKED, None) is not value.grad_fn:
        value.register_hook(rounded)
        setattr(value, HOOKED, value.grad_fn)
    return value


def _mark_only(value: torch.Tensor) -> bool:
    """An output that must keep its identity: a leaf that requires grad (rounding would make it a non-leaf)."""
    return value.is_leaf and value.requires_grad


def _cast(result: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """An explicit cast of a tracked tensor: ``.float()`` or ``.to(torch.float32)`` makes it float32 for CUDA
    too, so the result is an untracked alias (the cast returns the tensor itself when it is float32 already);
    ``.to(device)`` keeps it tracked."""
    source = args[0] if args else None
    if not isinstance(result, torch.Tensor) or result.dtype != torch.float32 or not is_half(source):
        return result
    named = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, (torch.dtype, str))]
    if torch.float32 in named or "torch.FloatTensor" in named or (not args[1:] and not kwargs):
        tensor: torch.Tensor = result
        return tensor.view_as(tensor) if tensor is source else tensor
    return result
