"""``inspect --distributed ddp|fsdp`` under ``torchrun``: join the process group, wrap the model, agree.

Every rank loads the checkpoint and the whole batch, takes its equal slice, wraps the model the way
training does (DDP, or FSDP2's ``fully_shard`` on every block and the root), and runs the same
``check()``; the reductions are in distributed.py. A step that fails on one rank must not leave the
others waiting in a collective: loading and the forward pass each end in an agreement (one all-reduce
of a flag), and the process group has a timeout for anything that still goes wrong.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
from torch import nn

from gradcheck_cli.distributed.reduce import initialized
from gradcheck_cli.errors import GradcheckError, first_line

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if initialized() else 1


@contextlib.contextmanager
def process_group(device: torch.device, timeout: float) -> Iterator[torch.device]:
    """Join the group torchrun set up (gloo on CPU, NCCL on CUDA); yield this rank's device; leave on exit."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise GradcheckError(
            "--distributed runs under torchrun, which sets " + ", ".join(missing) + ": "
            "torchrun --nproc-per-node N -m gradcheck_cli inspect CHECKPOINT --input BATCH --distributed ddp"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield device
        torch.distributed.barrier()  # every rank done before any tears the group down
    except RuntimeError as exc:
        if not _collective_failure(exc):
            raise
        raise GradcheckError(
            f"a collective failed or waited more than --timeout {timeout:g} s for the other ranks: another rank "
            f"probably failed (its error is above); {type(exc).__name__}: {first_line(exc)}"
        ) from None
    finally:
        torch.distributed.destroy_process_group()


def _collective_failure(exc: BaseException) -> bool:
    """A timeout or a lost peer in gloo/NCCL, not a bug of ours."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection closed", "peer"))


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 ``fully_shard`` on every block (the items of each ModuleList, else each child with
    parameters) and then the root, as FSDP2 training scripts do."""
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
    if not blocks:
        blocks = [child for child in model.children() if any(True for _ in child.parameters())]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model
