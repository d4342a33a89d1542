"""A batch file read from disk: a ``torch.save`` file (tensors only, always), ``.npy`` or ``.npz``."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradcheck_cli.errors import BatchError, GradcheckError, first_line
from gradcheck_cli.load.limits import MemoryBudget, memory_budget, require_regular_file
from gradcheck_cli.load.sizes import check_npy_file, check_npz_file, check_tensors, check_zip_directory
from gradcheck_cli.load.torch_file import read_torch_file

NPY_MAGIC = b"\x93NUMPY"


def load_batch_file(path: Path, budget: MemoryBudget | None = None) -> Any:
    """Read a batch: a ``torch.save`` file (tensors only, always), ``.npy`` or ``.npz``.

    Recognised by content. NumPy files are read with ``allow_pickle=False``; an ``.npz`` whose
    arrays are named ``arr_0, arr_1, ...`` (``np.savez(path, x, y)``) becomes a tuple, otherwise
    a dict of keyword tensors. Only regular files are opened, and what the file declares (zip records,
    ``.npy`` shapes, tensor views) is checked against ``budget`` (the process-wide one by default)
    before it is allocated.
    """
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
