"""The sample batch: read it from a file and split it into inputs and an optional target."""

from __future__ import annotations

import inspect
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from gradcheck_cli.errors import BatchError, GradcheckError, first_line

if TYPE_CHECKING:
    from gradcheck_cli.loaders.limits import MemoryBudget

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


NPY_MAGIC = b"\x93NUMPY"


def load_batch_file(path: Path, budget: MemoryBudget | None = None) -> Any:
    """Read a batch: a ``torch.save`` file (tensors only, always), ``.npy`` or ``.npz``.

    Recognised by content. NumPy files are read with ``allow_pickle=False``; an ``.npz`` whose
    arrays are named ``arr_0, arr_1, ...`` (``np.savez(path, x, y)``) becomes a tuple, otherwise
    a dict of keyword tensors. Only regular files are opened, and what the file declares (zip records,
    ``.npy`` shapes, tensor views) is checked against ``budget`` (the process-wide one by default)
    before it is allocated.
    """
    from gradcheck_cli.loaders.limits import memory_budget, require_regular_file  # the loaders import Batch
    from gradcheck_cli.loaders.sizes import check_npy_file, check_npz_file, check_tensors, check_zip_directory

    budget = budget if budget is not None else memory_budget()
    if not path.exists():
        raise BatchError(f"batch file not found: {path}")
    if path.is_dir():
        raise BatchError(f"--input must be a file (torch.save, .npy or .npz), not a directory: {path}")
    size = require_regular_file(path, BatchError, "batch file")  # before opening: a FIFO would block open()
    with path.open("rb") as handle:
        head = handle.read(8)
    if not head:
        raise BatchError(f"batch file {path} is empty (0 bytes)")
    if head.startswith(b"PK"):
        check_zip_directory(path, what="batch file", error=BatchError, budget=budget)
    if head.startswith(NPY_MAGIC) or (head.startswith(b"PK") and _is_npz(path)):
        if head.startswith(NPY_MAGIC):
            check_npy_file(path, size, error=BatchError, budget=budget)
        else:
            check_npz_file(path, error=BatchError, budget=budget)
        arrays = _load_numpy(path)
        check_tensors(arrays, source=path, what="batch file", error=BatchError, budget=budget)
        return arrays
    from gradcheck_cli.loaders.torch_file import read_torch_file

    try:
        return read_torch_file(path, trust=False, what="batch", error=BatchError, budget=budget)
    except BatchError:
        raise  # a size refusal, already in the batch's words
    except GradcheckError as exc:
        raise BatchError(
            f"{exc}; save the batch with torch.save(tensor | tuple | dict of tensors), np.save or np.savez"
        ) from None


def _is_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception:  # a damaged archive: let the torch reader report it
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _load_numpy(path: Path) -> Any:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return _tensor(loaded, path)
        with loaded:
            arrays = {name: _tensor(loaded[name], path) for name in loaded.files}
    except BatchError:
        raise
    except Exception as exc:  # numpy raises ValueError for object arrays, OSError/EOFError for damage
        raise BatchError(f"could not read {path} as NumPy data without pickle: {first_line(exc)}") from None
    if all(re.fullmatch(r"arr_\d+", name) for name in arrays):
        return tuple(arrays[name] for name in sorted(arrays, key=lambda name: int(name[4:])))
    return arrays


def _tensor(array: Any, path: Path) -> torch.Tensor:
    """The array as a C-contiguous tensor; np.load's fresh writable C-order arrays are not copied a second time."""
    try:
        owned = array.flags.writeable and array.flags.c_contiguous
        return torch.from_numpy(array if owned else array.copy(order="C"))
    except TypeError:
        raise BatchError(f"{path} holds a NumPy array of dtype {array.dtype}, which torch cannot use") from None


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
