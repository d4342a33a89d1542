"""The sample batch: read it from a file and split it into inputs and an optional target."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import BatchError
from gradcheck_cli.probe.modules import expected_input

_TARGET_KEYS = ("target", "targets", "y")


@dataclass(frozen=True)
class Batch:
    """Positional and keyword inputs for ``model(...)``, and a target when the batch has one."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor | None = None

    def describe(self) -> str:
        """One line such as ``x: float32[8, 3, 32, 32], target: int64[8]``."""
        parts = [describe_value(a) for a in self.args]
        parts += [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        if self.target is not None:
            parts.append(f"target {describe_value(self.target)}")
        return ", ".join(parts) if parts else "no inputs"

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every input moved to ``device``; the target stays on the host, where its class
        indices are checked without a device synchronisation, and goes to the device with the loss."""
        return Batch(
            args=tuple(_move(a, device) for a in self.args),
            kwargs={k: _move(v, device) for k, v in self.kwargs.items()},
            target=self.target,
        )


def describe_value(value: Any) -> str:
    """``float32[8, 3]`` for a tensor, a short form for containers and other values."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(str(s) for s in value.shape)}]"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe_value(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def make_batch(raw: Any, model: nn.Module) -> Batch:
    """Turn what the batch file held into a :class:`Batch` for ``model``.

    A tensor is the single input; a tuple or list is ``(inputs..., target)`` when the model's
    forward takes one argument fewer than the sequence holds, else all inputs; a dict becomes
    keyword arguments, except a ``target``/``targets``/``y`` key the forward does not accept.
    """
    if isinstance(raw, torch.Tensor):
        return Batch(args=(raw,))
    if isinstance(raw, Mapping):
        kwargs = dict(raw)
        accepted = _keyword_names(model)
        for key in _TARGET_KEYS:
            if key in kwargs and accepted is not None and key not in accepted:
                target = kwargs.pop(key)
                if not isinstance(target, torch.Tensor):
                    raise BatchError(f"batch key {key!r} must be a tensor, got {type(target).__name__}")
                return Batch(kwargs=kwargs, target=target)
        return Batch(kwargs=kwargs)
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        items = tuple(raw)
        if not items:
            raise BatchError("the batch is an empty sequence; save at least one input tensor")
        last_is_target = (
            len(items) >= 2
            and isinstance(items[-1], torch.Tensor)
            and _accepts_positional(model, len(items) - 1)
            and not _accepts_positional(model, len(items))
        )
        if last_is_target:
            return Batch(args=items[:-1], target=items[-1])
        return Batch(args=items)
    raise BatchError(
        f"the batch holds a {type(raw).__name__}; save a tensor, a tuple/list (inputs..., target) "
        "or a dict of keyword tensors"
    )


def _forward_signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _accepts_positional(model: nn.Module, count: int) -> bool:
    """Whether ``model.forward`` can be called with ``count`` positional arguments."""
    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is not None:  # TorchScript method: arguments[0] is self
        args = list(schema.arguments)[1:]
        required = sum(1 for a in args if not a.has_default_value())
        return required <= count <= len(args)
    signature = _forward_signature(model)
    if signature is None:
        return True
    try:
        signature.bind(*([None] * count))
    except TypeError:
        return False
    return True


def _keyword_names(model: nn.Module) -> set[str] | None:
    """Names ``forward`` accepts as keywords; None when it takes ``**kwargs`` or is unknown."""
    signature = _forward_signature(model)
    if signature is None:
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return set(signature.parameters)


def batch_misfit(model: nn.Module, batch: Batch, output: Any) -> str | None:
    """Why ``output`` cannot be compared with the batch's target because the *inputs* did not fit the model's first
    layer, in one line; None when the output has the batch's samples as they came in (then it is the target).

    A forward can run on inputs of the wrong shape and still return: a ``view(-1, 784)`` folds 3-channel 28×28
    images into 3× as many rows, a Linear over [8, 3, 32, 32] images acts on the last dimension and carries
    [8, 3, 32] through. The target is then blamed for what the inputs did.
    """
    x = next((v for v in (*batch.args, *batch.kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    pred = _first_float(output)
    if x is None or pred is None or pred.dim() == 0:
        return None
    rows = x.shape[0]
    target_rows = None if batch.target is None or batch.target.dim() == 0 else batch.target.shape[0]
    if pred.shape[0] != rows and target_rows in (None, rows):
        how = (
            f"its output {describe_value(pred)} has {pred.shape[0]} rows for the batch's {rows} samples "
            "(the forward reshaped the inputs, e.g. view(-1, n) folding channels into rows)"
        )
    elif x.dim() > 2 and pred.dim() == x.dim() and pred.shape[:-1] == x.shape[:-1] and target_rows == rows:
        how = (
            f"its output {describe_value(pred)} keeps the inputs' dimensions {list(x.shape[:-1])}: the first layer "
            "acted on the last dimension only (flatten the inputs, or give the shape the layer expects)"
        )
    else:
        return None
    expected = expected_input(model)
    layer = f" ({expected})" if expected else ""
    return f"the batch's inputs {describe_value(x)} do not fit the model's first layer{layer}: {how}"


def _first_float(value: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a (nested) model output: the one a target is compared with."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        found = _first_float(item)
        if found is not None:
            return found
    return None
