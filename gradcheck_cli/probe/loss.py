"""Choosing the scalar to differentiate (DESIGN.md §1) and saying which was chosen."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from gradcheck_cli.errors import BatchError
from gradcheck_cli.load.batch import describe_value
from gradcheck_cli.probe.results import LossChoice


def choose_loss(
    output: Any, target: torch.Tensor | None, seed: int, loss_output: int | str | None = None
) -> tuple[torch.Tensor, LossChoice]:
    """The loss for one probe: the model's own, else one that fits the target, else a projection.

    ``loss_output`` (an index into a tuple/list output, or a key of a dict-like one) names the output the loss
    is computed from; left out, a target is compared with the first floating-point output. When the output
    holds more tensors than the loss uses, the choice says which one it used and which it left out.
    Never ``output.sum()``: for softmax or normalised outputs its gradient is exactly zero.
    """
    if loss_output is not None:
        picked = select_output(output, loss_output)
        name = f"output[{loss_output!r}]"
        if target is None and isinstance(picked, torch.Tensor) and picked.dim() == 0 and picked.is_floating_point():
            return picked, LossChoice("model", f"{name} as the loss (chosen with loss_output)")
        loss, choice = (
            _target_loss(_main_tensor(picked), target) if target is not None else _projection_loss(picked, seed)
        )
        return loss, LossChoice(choice.kind, f"{choice.description}; computed from {name} (chosen with loss_output)")
    own = _own_loss(output)
    if own is not None:
        loss = own if own.dim() == 0 else own.mean()
        return loss, LossChoice("model", "the model's own loss (output.loss)")
    if target is not None:
        loss, choice = _target_loss(_main_tensor(output), target)
        return loss, LossChoice(choice.kind, choice.description + _left_out(output))
    return _projection_loss(output, seed)


def select_output(output: Any, key: int | str) -> Any:
    """``output[key]``: an item of a tuple/list output or of a dict-like one (a Hugging Face output too)."""
    if isinstance(key, int) and isinstance(output, (list, tuple)):
        if -len(output) <= key < len(output):
            return output[key]
    elif isinstance(key, str) and isinstance(output, Mapping) and key in output:
        return output[key]
    elif isinstance(key, str) and not isinstance(output, (torch.Tensor, list, tuple)) and hasattr(output, key):
        return getattr(output, key)
    choices = _output_keys(output)
    have = f"; it has {', '.join(choices)}" if choices else ""
    raise BatchError(f"the loss output {key!r} is not among the model's outputs ({describe_value(output)}){have}")


def _output_keys(output: Any) -> list[str]:
    if isinstance(output, Mapping):
        return [repr(k) for k in output]
    if isinstance(output, (list, tuple)):
        return [str(i) for i in range(len(output))]
    return []


def _left_out(output: Any) -> str:
    """A note naming the outputs a target loss did not use (it compares the first float tensor only)."""
    if isinstance(output, torch.Tensor) or not isinstance(output, (Mapping, list, tuple)):
        return ""
    items = list(output.items()) if isinstance(output, Mapping) else list(enumerate(output))
    used = next((k for k, v in items if next(float_leaves(v), None) is not None), None)
    unused = [k for k, v in items if k != used and next(float_leaves(v), None) is not None]
    if used is None or not unused:
        return ""
    names = ", ".join(f"output[{k!r}]" for k in unused)
    return (
        f"; the loss used output[{used!r}] of {len(items)} outputs and left out {names}, so layers that feed only "
        "those get no gradient here (choose another output with loss_output / --loss-output)"
    )


def _own_loss(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.requires_grad:
        return loss
    return None


def _main_tensor(output: Any) -> torch.Tensor:
    """The prediction to compare with a target: the output itself or its first float tensor."""
    for leaf in float_leaves(output):
        return leaf
    raise BatchError(f"the model returned {describe_value(output)}, which has no tensor to compare with the target")


def _target_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, LossChoice]:
    is_index = not target.is_floating_point() and not target.is_complex()
    if is_index and pred.dim() >= 2 and target.shape == pred.shape[:1] + pred.shape[2:]:
        # checked on the host: free for a target that is there (the CLI keeps it there); one copy otherwise
        _check_class_indices(target.cpu(), pred.shape[1])
    target = target.to(pred.device)
    if is_index and pred.dim() >= 2 and target.shape == pred.shape[:1] + pred.shape[2:]:
        loss = F.cross_entropy(pred.float(), target.long())
        return loss, LossChoice(
            "cross_entropy",
            f"cross-entropy: output {describe_value(pred)} holds class scores for target {describe_value(target)}",
        )
    if target.shape == pred.shape:
        loss = F.mse_loss(pred.float(), target.float())
        return loss, LossChoice("mse", f"mean squared error: output and target are both {describe_value(pred)}")
    raise BatchError(
        f"the target {describe_value(target)} fits neither cross-entropy nor MSE for the model's output "
        f"{describe_value(pred)}; save class indices of shape {list(pred.shape[:1] + pred.shape[2:])} "
        f"or a target of shape {list(pred.shape)}"
    )


IGNORE_INDEX = -100
"""``F.cross_entropy``'s default ``ignore_index``: targets with this value do not count."""


def _check_class_indices(target: torch.Tensor, classes: int) -> None:
    """Every class index in [0, classes) or the ignore index, and at least one that counts."""
    counted = target[target != IGNORE_INDEX]
    if counted.numel() == 0:
        raise BatchError(f"every target is the ignore index {IGNORE_INDEX}, so the loss is undefined")
    low, high = int(counted.min()), int(counted.max())
    if low < 0 or high >= classes:
        raise BatchError(
            f"class indices in the target run from {low} to {high}, but the output has {classes} classes "
            f"(valid: 0…{classes - 1}, or {IGNORE_INDEX} to ignore)"
        )


def _projection_loss(output: Any, seed: int) -> tuple[torch.Tensor, LossChoice]:
    leaves = [leaf for leaf in float_leaves(output) if leaf.requires_grad]
    if not leaves:
        raise BatchError(
            f"the model returned {describe_value(output)}, and no floating-point output depends on its parameters"
        )
    from gradcheck_cli.distributed.reduce import current

    sharding = current()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = leaves[0].new_zeros((), dtype=torch.float32)
    for leaf in leaves:
        if sharding is None or leaf.dim() == 0:
            r = torch.randn(leaf.shape, generator=generator).to(device=leaf.device)
            total = total + (leaf.float() * r).sum() / math.sqrt(max(leaf.numel(), 1))
            continue
        # this rank's rows of the projection of the whole batch, scaled by W: DDP/FSDP average the
        # gradients over ranks, which then is the gradient of the whole batch's projection
        rows = leaf.shape[0]
        whole = torch.randn((rows * sharding.world, *leaf.shape[1:]), generator=generator)
        r = whole[sharding.rank * rows : (sharding.rank + 1) * rows].to(device=leaf.device)
        scale = sharding.world / math.sqrt(max(whole.numel(), 1))
        total = total + (leaf.float() * r).sum() * scale
    return total, LossChoice(
        "random_projection",
        f"random projection Σ⟨output, r⟩/√n with r ~ N(0, 1), seed {seed} "
        "(the batch has no target and the model returns no loss)",
    )


def float_leaves(value: Any) -> Iterator[torch.Tensor]:
    """Floating-point tensors inside a (nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from float_leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from float_leaves(v)
