"""Declared sizes checked against the :class:`~gradcheck_cli.load.limits.MemoryBudget` before allocating.

- Zip archives (``torch.save`` files, TorchScript, ``.pt2``, ``.npz``): every record's declared uncompressed
  size, read from the central directory; a stored record must declare what it stores; deflated records may
  expand by at most the budget's expansion allowance (``torch.save`` writes records stored, TorchScript
  deflates only its small code files; ``np.savez_compressed`` is legitimate but bounded the same way).
- Legacy (non-zip) torch files: the distinct storages the pickle declares (read without running it,
  :mod:`~gradcheck_cli.load.legacy_storages`) must fit in the file; the tensors, rebuilt on the meta device
  under ``FakeTensorMode`` (nothing allocated, nothing read), must fit the budget.
- Loaded tensors: ``numel × element size`` against the bytes their storage really holds. A stride-0
  (expanded) view costs nothing to load, but the forward pass, a device move or a dtype cast materialises
  it; beyond the expansion allowance it is refused.
- ``.npy`` headers (alone or inside an ``.npz``): ``shape × itemsize`` against the budget and the bytes the
  file holds after the header.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.legacy_storages import declared_storage_bytes
from gradcheck_cli.load.limits import FLAG, MemoryBudget, format_bytes, memory_budget

ZIP_MAGIC = b"PK\x03\x04"
TORCH_REPACK_HINT = (
    "torch writes tensor data uncompressed, so this archive was repacked or crafted: re-save it with torch.save "
    "(or repack it uncompressed, zip -0)"
)
NUMPY_REPACK_HINT = "save a smaller batch, or save it uncompressed (np.savez)"


def raise_hint() -> str:
    """What to do when a file honestly needs more memory."""
    return f"raise {FLAG} if it really needs that much"


# --------------------------------------------------------------------------- zip archives

RECORD_OVERHEAD = 1024
"""Memory per zip record to read its directory entry (zipfile and torch's miniz each keep one; ~600 bytes
measured for zipfile), counted against the expansion allowance: it is memory the file does not store."""


def check_zip_directory(
    path: Path, *, what: str, error: type[GradcheckError], budget: MemoryBudget | None = None
) -> None:
    """Refuse a zip listing so many records that reading its directory alone takes the expansion allowance.

    Reads only the end-of-central-directory record, before :mod:`zipfile` builds an object per entry.
    """
    budget = budget if budget is not None else memory_budget()
    end_record = getattr(zipfile, "_EndRecData", None)
    total_index = getattr(zipfile, "_ECD_ENTRIES_TOTAL", None)
    if end_record is None or total_index is None:  # another Python: the record checks still run after
        return
    try:
        with path.open("rb") as handle:
            end = end_record(handle)
    except Exception:  # unreadable: the loader reports it
        return
    entries = int(end[total_index]) if end else 0
    if entries * RECORD_OVERHEAD > budget.expansion_bytes:
        raise error(
            f"{what} {path} lists {entries} records in its zip directory, about "
            f"{format_bytes(entries * RECORD_OVERHEAD)} to read before any data, beyond {budget.expansion_limit()}; "
            f"{raise_hint()}"
        )


def check_zip_archive(
    path: Path,
    *,
    what: str,
    error: type[GradcheckError],
    budget: MemoryBudget | None = None,
    repack_hint: str = TORCH_REPACK_HINT,
    nested: bool = False,
) -> None:
    """Refuse a zip whose records declare more than ``budget`` allows, reading only its central directory.

    ``nested``: also check the zip archives stored inside it (the pickles of a ``.pt2`` archive), which
    torch opens from memory. An archive :mod:`zipfile` cannot open is left for the loader to report.
    """
    budget = budget if budget is not None else memory_budget()
    check_zip_directory(path, what=what, error=error, budget=budget)
    try:
        archive = zipfile.ZipFile(path)
    except Exception:  # damaged: the loader says so in its own words
        return
    with archive:
        _check_records(archive, f"{what} {path}", error, budget, repack_hint)
        if nested:
            _check_nested(archive, f"{what} {path}", error, budget, repack_hint)


def _check_records(
    archive: zipfile.ZipFile, label: str, error: type[GradcheckError], budget: MemoryBudget, repack_hint: str
) -> None:
    infos = archive.infolist()
    declared = sum(info.file_size for info in infos)
    deflated = [info for info in infos if info.compress_type != zipfile.ZIP_STORED]
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise error(
                f"{label} is a damaged or crafted zip archive: record {info.filename} declares "
                f"{format_bytes(info.file_size)} but stores {format_bytes(info.compress_size)} uncompressed; "
                "save it again"
            )
    expansion = sum(max(0, info.file_size - info.compress_size) for info in deflated)
    if expansion > budget.expansion_bytes:
        largest = max(deflated, key=lambda info: info.file_size)
        raise error(
            f"{label} holds deflated records that expand {format_bytes(sum(i.compress_size for i in deflated))} "
            f"into {format_bytes(sum(i.file_size for i in deflated))} (largest: {largest.filename}, "
            f"{format_bytes(largest.file_size)}), beyond {budget.expansion_limit()}; "
            f"{repack_hint}, or {raise_hint()}"
        )
    if declared > budget.max_bytes:
        largest = max(infos, key=lambda info: info.file_size)
        raise error(
            f"{label} declares {format_bytes(declared)} in {len(infos)} record(s) (largest: {largest.filename}, "
            f"{format_bytes(largest.file_size)}), over {budget.limit()}; {raise_hint()}"
        )
    _check_version_records(archive, infos, label, error)


_VERSION = re.compile(rb"\s*\d{1,9}\s*")
VERSION_RECORDS = ("version", ".format_version", ".storage_alignment")
"""Records torch reads as a number (C++ ``stoull``, which fails with that one word on anything else)."""


def _check_version_records(
    archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], label: str, error: type[GradcheckError]
) -> None:
    for info in infos:
        if info.filename.rsplit("/", 1)[-1] not in VERSION_RECORDS:
            continue
        try:
            content = archive.read(info) if info.file_size <= 64 else b"?" * 21
        except Exception:  # a damaged archive: the loader says so in its own words
            return
        if not _VERSION.fullmatch(content):
            shown = content[:20].decode("ascii", "backslashreplace") + ("…" if len(content) > 20 else "")
            raise error(
                f"{label} is a damaged or crafted archive: its {info.filename} record holds {shown!r} "
                f"({format_bytes(info.file_size)}), not the small number torch writes there; save it again"
            )


def _check_nested(
    archive: zipfile.ZipFile, label: str, error: type[GradcheckError], budget: MemoryBudget, repack_hint: str
) -> None:
    """The zip archives inside ``archive`` (a ``.pt2``'s pickled weights and sample inputs), one level deep."""
    for info in archive.infolist():
        if info.file_size < len(ZIP_MAGIC) or info.is_dir():
            continue
        try:
            with archive.open(info) as member:
                if member.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                    continue
            with archive.open(info) as member, zipfile.ZipFile(member) as inner:
                _check_records(inner, f"{label} (in {info.filename})", error, budget, repack_hint)
        except GradcheckError:
            raise
        except Exception:  # not a zip after all, or damaged: the loader reports it
            continue


# --------------------------------------------------------------------------- legacy torch files


def check_legacy_torch_file(
    path: Path, file_size: int, *, what: str, error: type[GradcheckError], budget: MemoryBudget | None = None
) -> None:
    """A legacy (non-zip) ``torch.save`` file: its declared storages must fit in the file and the budget.

    torch allocates each storage the pickle declares *before* reading its bytes from the file, and grows a
    storage a view overruns; here the pickle is rebuilt on the meta device under ``FakeTensorMode`` (no
    allocation, no data read), tensors-only. A file that does not load that way is left to the real load.
    """
    budget = budget if budget is not None else memory_budget()
    total = declared_storage_bytes(path)  # distinct storages: views of one buffer count once
    if total is not None and total > file_size:
        raise error(
            f"{what} {path} declares {format_bytes(total)} of tensor storage but the file holds only "
            f"{format_bytes(file_size)}; it is damaged or crafted: re-save it with torch.save"
        )
    try:
        fake = _fake_load(path)
    except Exception:  # needs --trust, damaged, or an exotic tensor type: the real load says what it is
        return
    check_tensors(fake, source=path, what=what, error=error, budget=budget)


# --------------------------------------------------------------------------- loaded tensors


def _fake_load(path: Path) -> Any:
    """The file's tensors rebuilt on the meta device, tensors-only (any pickle protocol)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gradcheck_cli.load.safety import load_tensors_only

    with FakeTensorMode(allow_non_fake_inputs=True):
        return load_tensors_only(path)


def iter_tensors(value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists, tuples and modules (parameters and buffers), with a path name.

    Each container is visited once: a pickle can make a list that holds itself, twice.
    """
    pending: list[tuple[str, Any]] = [("", value)]
    visited: set[int] = set()
    while pending:
        name, item = pending.pop()
        if isinstance(item, torch.Tensor):
            yield name, item
            continue
        if not isinstance(item, (nn.Module, Mapping, list, tuple)) or id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, nn.Module):
            try:
                children: list[tuple[str, Any]] = list(item.state_dict(keep_vars=True).items())
            except Exception:  # a module whose state_dict fails: its load reports that
                continue
        elif isinstance(item, Mapping):
            children = [(str(key), child) for key, child in item.items()]
        else:
            children = [(f"[{index}]", child) for index, child in enumerate(item)]
        for key, child in reversed(children):
            joined = f"{name}{key}" if key.startswith("[") else f"{name}.{key}" if name else key
            pending.append((joined, child))


def describe_tensor(tensor: torch.Tensor, name: str = "") -> str:
    """``x: float32[100000000, 4]``, or ``a tensor float32[100000000, 4]`` without a name."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    shape = f"{dtype}[{', '.join(str(s) for s in tensor.shape)}]"
    return f"{name}: {shape}" if name else f"a tensor {shape}"


def check_tensors(
    value: Any, *, source: Path, what: str, error: type[GradcheckError], budget: MemoryBudget | None = None
) -> int:
    """Refuse tensors whose ``numel × element size`` exceeds the budget or, beyond the expansion allowance,
    the bytes their storage holds (a stride-0 or overlapping view). Returns the tensors' total bytes.

    Run after a tensors-only load and before anything that could materialise a view (a device move, a
    cast, a forward pass): loading itself allocates only the stored bytes.
    """
    budget = budget if budget is not None else memory_budget()
    total = 0
    seen: set[tuple[Any, ...]] = set()
    for name, tensor in iter_tensors(value):
        if tensor.layout is not torch.strided:
            continue
        logical = tensor.numel() * tensor.element_size()
        if logical > budget.max_bytes:
            raise error(
                f"{what} {source} declares {describe_tensor(tensor, name)} ({format_bytes(logical)}), over "
                f"{budget.limit()}; {raise_hint()}"
            )
        try:
            stored = tensor.untyped_storage().nbytes()
        except Exception:  # a tensor without a storage (a functional wrapper): nothing to compare
            stored = logical
        if logical - stored > budget.expansion_bytes:
            raise error(
                f"{what} {source} declares {describe_tensor(tensor, name)} ({format_bytes(logical)}) backed by "
                f"only {format_bytes(stored)} of storage (strides {list(tensor.stride())}: an expanded or "
                f"overlapping view that a forward pass or copy materialises), beyond {budget.expansion_limit()}; "
                f"save it with .contiguous() at the size you need, or {raise_hint()}"
            )
        key = (_storage_id(tensor), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key not in seen:  # a tensor stored under two names (tied weights) is loaded once
            seen.add(key)
            total += logical
    if total > budget.max_bytes:
        raise error(
            f"{what} {source} declares {format_bytes(total)} of tensors in all, over {budget.limit()}; {raise_hint()}"
        )
    return total


def _storage_id(tensor: torch.Tensor) -> int:
    """An identity of the storage behind ``tensor`` (views of one storage share it)."""
    try:
        return int(tensor.untyped_storage()._cdata)
    except Exception:  # a tensor without a storage
        return id(tensor)


# --------------------------------------------------------------------------- NumPy


def check_npy_file(path: Path, file_size: int, *, error: type[GradcheckError], budget: MemoryBudget | None) -> None:
    """A ``.npy`` file's header: its shape × itemsize must fit the budget and the bytes after the header."""
    budget = budget if budget is not None else memory_budget()
    with path.open("rb") as handle:
        _check_npy_header(handle, file_size, f"batch file {path}", error, budget)


def check_npz_file(path: Path, *, error: type[GradcheckError], budget: MemoryBudget | None) -> None:
    """An ``.npz`` archive: its members' declared sizes (:func:`check_zip_archive`), then each ``.npy`` header."""
    budget = budget if budget is not None else memory_budget()
    check_zip_archive(path, what="batch file", error=error, budget=budget, repack_hint=NUMPY_REPACK_HINT)
    try:
        archive = zipfile.ZipFile(path)
    except Exception:  # damaged: np.load reports it
        return
    with archive:
        for info in archive.infolist():
            try:
                with archive.open(info) as member:
                    _check_npy_header(member, info.file_size, f"batch file {path} ({info.filename})", error, budget)
            except GradcheckError:
                raise
            except Exception:  # a damaged member: np.load reports it
                continue


def _check_npy_header(
    stream: IO[bytes], size: int, label: str, error: type[GradcheckError], budget: MemoryBudget
) -> None:
    header = _read_npy_header(stream)
    if header is None:
        return
    shape, dtype = header
    needed = math.prod(shape) * dtype.itemsize
    available = size - stream.tell()
    described = f"{dtype}[{', '.join(str(s) for s in shape)}]"
    if needed > budget.max_bytes:
        raise error(
            f"{label} declares an array {described} ({format_bytes(needed)}), over {budget.limit()}; {raise_hint()}"
        )
    if needed > max(available, 0):
        raise error(
            f"{label} declares an array {described} ({format_bytes(needed)}) but holds only "
            f"{format_bytes(max(available, 0))} of data;"
            " it is truncated or crafted: save it again with np.save or np.savez"
        )


def _read_npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """``(shape, dtype)`` of a ``.npy`` stream positioned at its start; None when it is not one numpy can read."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(stream)
        else:
            reader = getattr(fmt, "_read_array_header", None)
            if reader is None:
                return None
            shape, _, dtype = reader(stream, version)
    except Exception:  # not .npy, or a damaged header: np.load reports it
        return None
    if dtype.hasobject or not all(isinstance(s, int) and s >= 0 for s in shape):
        return None
    return tuple(shape), dtype


def is_zip_bytes(data: bytes) -> bool:
    """Whether ``data`` starts like a zip archive."""
    return data[: len(ZIP_MAGIC)] == ZIP_MAGIC


def check_zip_bytes(
    data: bytes, label: str, *, error: type[GradcheckError], budget: MemoryBudget | None = None
) -> None:
    """:func:`check_zip_archive` for an archive held in memory (a pickle read from inside a ``.pt2``)."""
    budget = budget if budget is not None else memory_budget()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception:
        return
    with archive:
        _check_records(archive, label, error, budget, TORCH_REPACK_HINT)
