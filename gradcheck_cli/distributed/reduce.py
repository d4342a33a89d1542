"""gradcheck inside ``torch.distributed``: which numbers are reduced how, so that N ranks report what one
process would on the same global batch.

Every rank runs the same probe on its own slice of the global batch (equal slices), through the
wrapper the user trains with (DDP, or FSDP2's ``fully_shard``), so that backward does the framework's
own gradient reduction. Then, in one collective per kind of number (``reduce_pieces``):

- parameter gradients and weights: DDP's are identical on every rank after its all-reduce (nothing to
  do); FSDP2's are DTensor shards (``Shard(0)``), so each rank's sum of squares is summed and the root
  taken, and maxima are maxed;
- activation gradients ‖∂L/∂h‖: each rank sees only its slice, and its loss is the mean over that slice
  (DDP averages gradients over ranks), so the gradient of the global mean loss at its slice is 1/W of
  its own: ‖·‖ over the batch = √(Σ_r ‖g_r‖²)/W, max |·| = max_r/W;
- the loss: the mean over ranks; the model's output max: the max; activation statistics and exponent
  histograms: the mean (their shares come from samples of each slice).

Not reduced, and said so where it matters: BatchNorm statistics are per rank (unless SyncBatchNorm),
dropout masks differ from a single process's, and a loss that is not a mean over equal slices (tokens
ignored unevenly) weighs ranks differently.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

MODES = ("ddp", "fsdp")
T = TypeVar("T")

PARAM_NORM = "param_norm"
"""A norm of parameters or their gradients: nothing for DDP, √Σ squares over FSDP2 shards."""
PARAM_MAX = "param_max"
PARAM_COUNT = "param_count"
"""Histogram counts that mix parameter gradients and activation samples: the mean over ranks."""
ACT_NORM = "act_norm"
"""An activation-gradient norm of one rank's slice: √Σ squares / W."""
ACT_MAX = "act_max"
MAX = "max"
MEAN = "mean"
FIRST = "first"
"""A step index or -1: the smallest non-negative one over ranks (the first step any rank saw)."""
NONE = "none"
"""Already the whole batch's (a shared output's gradient, summed over ranks)."""
KINDS = (PARAM_NORM, PARAM_MAX, PARAM_COUNT, ACT_NORM, ACT_MAX, MAX, MEAN, FIRST, NONE)


@dataclass(frozen=True)
class Sharding:
    """How the model is distributed in this process."""

    mode: str
    """``ddp`` or ``fsdp``."""
    rank: int
    world: int


_CURRENT: contextvars.ContextVar[Sharding | None] = contextvars.ContextVar("gradcheck_sharding", default=None)


def current() -> Sharding | None:
    """The sharding of the probe running now; None on a single process."""
    return _CURRENT.get()


@contextlib.contextmanager
def sharded(sharding: Sharding | None) -> Iterator[None]:
    token = _CURRENT.set(sharding)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def collective_device() -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL, else the CPU (gloo)."""
    if initialized() and "nccl" in str(torch.distributed.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialized() -> bool:
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its shard), or the tensor itself."""
    if is_dtensor(tensor):
        part: torch.Tensor = tensor.to_local()  # type: ignore[attr-defined]
        return part
    return tensor


def data_parallel() -> Sharding | None:
    """Inside a process group of several ranks, a module taken as one replica of data-parallel training
    (``watch(model.module, data_parallel=True)``, the Lightning and HF callbacks): the loop's forward still goes
    through the user's DDP, so its gradients are reduced and its activations are per rank."""
    if not initialized() or torch.distributed.get_world_size() < 2:
        return None
    return Sharding("ddp", torch.distributed.get_rank(), torch.distributed.get_world_size())


def detect(model: nn.Module) -> Sharding | None:
    """DDP-wrapped or FSDP2-sharded model inside an initialised process group; None otherwise."""
    if not initialized():
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return Sharding("ddp", rank, world)
    if any(is_dtensor(p) for p in model.parameters()):
        return Sharding("fsdp", rank, world)
    return None


def reduce_pieces(pieces: Sequence[torch.Tensor], kinds: Sequence[str], sharding: Sharding) -> list[torch.Tensor]:
    """Each piece reduced over the ranks by its kind: at most one collective per kind present."""
    _same_everywhere([len(pieces), *(sum(1 for k in kinds if k == kind) for kind in KINDS)], "numbers measured")
    out = list(pieces)
    device = collective_device()
    groups: dict[str, list[int]] = {}
    for index, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(index)
    for kind, indices in groups.items():
        if kind == NONE or (sharding.mode == "ddp" and kind in (PARAM_NORM, PARAM_MAX)):
            continue  # identical on every rank (DDP's all-reduce, or summed already)
        flat = torch.cat([out[i].detach().reshape(-1).double().to(device) for i in indices])
        reduced = _reduce(flat, kind, sharding.world)
        start = 0
        for i in indices:
            size = out[i].numel()
            out[i] = reduced[start : start + size].reshape(out[i].shape).to(dtype=out[i].dtype, device=out[i].device)
            start += size
    return out


def _reduce(flat: torch.Tensor, kind: str, world: int) -> torch.Tensor:
    dist = torch.distributed
    if kind in (PARAM_NORM, ACT_NORM):
        squares = flat * flat
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        root = squares.sqrt()
        return root / world if kind == ACT_NORM else root
    if kind in (PARAM_MAX, ACT_MAX, MAX):
        nan = torch.isnan(flat).double()
        dist.all_reduce(nan, op=dist.ReduceOp.SUM)  # MAX need not propagate NaN: carry it on the side
        peak = torch.nan_to_num(flat, nan=-math.inf)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        peak = torch.where(nan > 0, torch.full_like(peak, math.nan), peak)
        return peak / world if kind == ACT_MAX else peak
    if kind == FIRST:
        seen = torch.where(flat < 0, torch.full_like(flat, math.inf), flat)
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)
        return torch.where(torch.isinf(seen), torch.full_like(seen, -1.0), seen)
    if kind in (MEAN, PARAM_COUNT):
        total = flat.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / world
    raise ValueError(f"unknown reduction {kind!r}")


def _same_everywhere(counts: Sequence[int], what: str) -> None:
    """One small collective: every rank must send the same numbers of values of each kind, or the data
    collectives that follow would mismatch (a crash or a hang); a clear error instead."""
    values = [float(c) for c in counts]
    both = torch.tensor([*values, *(-v for v in values)], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    high, low = both[: len(values)].tolist(), [-v for v in both[len(values) :].tolist()]
    if high != low:
        from gradcheck_cli.errors import GradcheckError

        raise GradcheckError(
            f"the ranks disagree on the {what} ({int(high[0])} on one, {int(low[0])} on another): every rank must "
            "run the same model on an equal slice of the batch"
        )


def summed_over_ranks(
    recorder: Any, sharding: Sharding | None
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(L2, max |g|) of the shared outputs' gradients (``recorder.shared``: no dimension of the slice's size, like
    a position embedding's), summed over ranks in one collective and ÷ W like every rank's loss."""
    if sharding is None:
        return {}
    _same_everywhere([len(recorder.shared)], "outputs shared by the whole batch")
    if not recorder.shared:
        return {}
    from gradcheck_cli.probe.norms import norm_and_max_abs

    keys = list(recorder.shared)
    flat = torch.cat([recorder.shared[k].reshape(-1).double().to(collective_device()) for k in keys])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat = flat / sharding.world
    out = {}
    start = 0
    for key in keys:
        size = recorder.shared[key].numel()
        out[key] = norm_and_max_abs(flat[start : start + size].float())
        start += size
    return out


def all_agree(ok: bool) -> bool:
    """True on every rank only when ``ok`` on every rank (one collective); True without a process group."""
    if not initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.SUM)
    return bool(flag.item() == 0.0)


def agreed(what: str, run: Callable[[], T]) -> T:
    """``run()`` on every rank, then one flag all-reduced: every rank fails when any rank failed.

    The rank that failed raises its own error (exit 2 with its message); the others raise one that
    points at it, instead of waiting in the next collective until the timeout.
    """
    try:
        value = run()
    except BaseException:
        all_agree(False)
        raise
    if not all_agree(True):
        from gradcheck_cli.errors import GradcheckError

        raise GradcheckError(f"{what} failed on another rank (its error is above); nothing was measured")
    return value


def split_batch(value: Any, rank: int, world: int) -> Any:
    """This rank's equal slice (dim 0) of every tensor in a batch (tensor, tuple/list, dict, or a ready Batch)."""
    from gradcheck_cli.load.batch import Batch

    if isinstance(value, Batch):
        return Batch(
            args=split_batch(value.args, rank, world), kwargs=split_batch(value.kwargs, rank, world),
            target=split_batch(value.target, rank, world),
        )  # fmt: skip
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        size = value.shape[0]
        if size % world:
            from gradcheck_cli.errors import BatchError

            raise BatchError(
                f"the batch has {size} samples, which do not split evenly over {world} ranks; save a batch whose "
                f"size is a multiple of {world}"
            )
        step = size // world
        return value[rank * step : (rank + 1) * step]
    if isinstance(value, dict):
        return {k: split_batch(v, rank, world) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(split_batch(v, rank, world) for v in value)
    return value
