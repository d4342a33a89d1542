"""DCP ``.metadata``: the restricted unpickler that reads it without ``--trust``, and the shard files it names.

DCP's own reader unpickles ``.metadata`` with plain :func:`pickle.load`. Without ``--trust`` it is read by
:class:`_MetadataUnpickler`, which imports only the classes DCP metadata holds (:data:`ALLOWED_GLOBALS`,
torch dtypes) and refuses anything else, naming it; then every field's type is checked and every shard
file it names must lie inside the directory, be present and be long enough.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, NoReturn

import torch

from gradcheck_cli.errors import CheckpointError, UntrustedCheckpointError, first_line
from gradcheck_cli.load.factory import importable_from_cwd
from gradcheck_cli.load.sniff import DCP_METADATA, DCP_SHARD_SUFFIX

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_LEGACY_METADATA = "torch.distributed._shard.sharded_tensor.metadata"

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # what torch 2.13's dcp.save pickles into .metadata (found by pickling real checkpoints: plain,
        # nested model+optimizer, get_state_dict, FSDP2 over 2 ranks, bf16/fp16/int/bool/complex tensors)
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout("torch.strided")
        # DCP metadata written by torch <= 2.1 kept TensorProperties in the sharded-tensor module
        (_LEGACY_METADATA, "TensorProperties"),
        (_LEGACY_METADATA, "MEM_FORMAT_ENCODING"),
    }
)
"""Classes and functions the restricted ``.metadata`` unpickler imports; torch dtypes are allowed besides."""

_PATH_GLOBALS: dict[tuple[str, str], type[PurePosixPath] | type[PureWindowsPath]] = {
    (module, name): pure
    for module in ("pathlib", "pathlib._local")  # Python 3.13 pickles pathlib classes from pathlib._local
    for name, pure in (
        ("PosixPath", PurePosixPath),
        ("PurePosixPath", PurePosixPath),
        ("WindowsPath", PureWindowsPath),
        ("PureWindowsPath", PureWindowsPath),
    )
}
"""``StorageMeta.checkpoint_id`` is the writer's ``Path``; it is rebuilt as a pure path (no file access,
and a Windows path still loads on Linux)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Imports only DCP metadata classes; anything else raises before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _PATH_GLOBALS:
            return _PATH_GLOBALS[module, name]
        if module == "torch" and isinstance(dtype := vars(torch).get(name), torch.dtype):
            return dtype  # vars(), not getattr(): torch's module __getattr__ would import lazy submodules
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("DCP metadata holds no persistent ids")


_REFUSED_OPCODES = frozenset({"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "PERSID", "BINPERSID"})
"""Opcodes DCP metadata never uses; CPython's unpickler mishandles a damaged BYTEARRAY8 (it prints a
SystemError while cleaning up), so they are refused before unpickling."""


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle without executing it: it must be complete and use no buffer or persistent-id opcodes."""
    for opcode, _arg, _pos in pickletools.genops(data):
        if opcode.name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"unexpected {opcode.name} opcode")


class _Refused(pickle.UnpicklingError):
    """A global outside :data:`ALLOWED_GLOBALS`; ``args[0]`` names it."""


# --------------------------------------------------------------------------- metadata and shards


def read_metadata(directory: Path, *, trust: bool) -> Any:
    """The checkpoint's ``Metadata``: restricted unpickling, or DCP's own reader with ``trust``."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    path = directory / DCP_METADATA
    if not path.is_file():
        _missing_metadata(directory)
    try:
        if trust:
            importable_from_cwd()
            metadata = FileSystemReader(directory).read_metadata()
        else:
            data = path.read_bytes()
            _check_opcodes(data)
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        name = exc.args[0] if exc.args[0].isprintable() else ascii(exc.args[0])
        raise UntrustedCheckpointError(
            f"{path} would import {name} when unpickled, which DCP metadata never holds; pass --trust only "
            "if you trust where it came from",
            [name],
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a damaged pickle raises anything from EOFError to KeyError
        raise CheckpointError(
            f"{path} is not readable DCP metadata ({first_line(exc)}); was it copied or written completely?"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} is not DCP metadata (it holds a {type(metadata).__name__})")
    if not _well_formed(metadata):
        raise CheckpointError(f"{path} is damaged DCP metadata (an entry has the wrong type or shape)")
    return metadata


def _well_formed(metadata: Any) -> bool:
    """The fields the loader relies on are there and have DCP's types (a damaged or crafted pickle can
    hold anything, including instances of the allowed classes with other attributes)."""
    try:
        return _check_fields(metadata)
    except Exception:  # a missing attribute, an unhashable key, ...
        return False


def _check_fields(metadata: Any) -> bool:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    def sizes(value: Any) -> bool:
        return isinstance(value, torch.Size) and all(type(n) is int and n >= 0 for n in value)

    def chunk(value: Any, rank: int) -> bool:
        return (
            isinstance(value, ChunkStorageMetadata)
            and sizes(value.offsets)
            and sizes(value.sizes)
            and len(value.offsets) == len(value.sizes) == rank
        )

    def entry(value: Any) -> bool:
        if isinstance(value, BytesStorageMetadata):
            return True
        return (
            isinstance(value, TensorStorageMetadata)
            and isinstance(value.properties.dtype, torch.dtype)
            and sizes(value.size)
            and isinstance(value.chunks, list)
            and all(chunk(c, len(value.size)) for c in value.chunks)
        )

    def index(value: Any) -> bool:
        return (
            isinstance(value, MetadataIndex)
            and isinstance(value.fqn, str)
            and (value.offset is None or sizes(value.offset))
            and (value.index is None or type(value.index) is int)
        )

    def stored(value: Any) -> bool:
        transforms = value.transform_descriptors
        return (
            isinstance(value, _StorageInfo)
            and isinstance(value.relative_path, str)
            and type(value.offset) is int
            and type(value.length) is int
            and value.offset >= 0
            and value.length >= 0
            and (
                transforms is None
                or (isinstance(transforms, (list, tuple)) and all(isinstance(t, str) for t in transforms))
            )
        )

    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    return (
        isinstance(entries, dict)
        and isinstance(storage, dict)
        and all(isinstance(k, str) and entry(v) for k, v in entries.items())
        and all(index(k) and stored(v) for k, v in storage.items())
    )


def _missing_metadata(directory: Path) -> NoReturn:
    shards = sorted(p.name for p in directory.glob(f"*{DCP_SHARD_SUFFIX}"))
    local = sorted(p.name for p in directory.glob(f"__*{DCP_METADATA}"))
    if local:
        raise CheckpointError(
            f"{directory} has only rank-local metadata ({', '.join(local[:3])}), written without rank "
            "coordination; gradcheck reads checkpoints with one global .metadata (save with dcp.save in "
            "the default collective mode)"
        )
    raise CheckpointError(
        f"the checkpoint {directory} is incomplete: .metadata is written last by rank 0 after every rank "
        f"finished, and it is missing ({len(shards)} {DCP_SHARD_SUFFIX} file(s) present); the save did not "
        "finish, so save again or copy the complete directory"
    )


def check_shards(directory: Path, metadata: Any) -> None:
    """Every shard file the metadata names is inside ``directory``, present and long enough."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():  # types checked by read_metadata
        name = info.relative_path
        if not name.isprintable() or PurePosixPath(name).name != name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(
                f"{directory / DCP_METADATA} names a shard file outside the checkpoint directory ({name!r}); "
                "refusing to read it"
            )
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    missing = sorted(name for name in needed if not (directory / name).is_file())
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(
            f"the checkpoint {directory} is incomplete: {len(missing)} of {len(needed)} shard file(s) named in "
            f".metadata are missing ({shown}); a rank did not finish writing or the copy lost them, so copy "
            "the complete directory or save again"
        )
    short = [
        f"{name} ({size} of {needed[name]} bytes)"
        for name in sorted(needed)
        if (size := (directory / name).stat().st_size) < needed[name]
    ]
    if short:
        raise CheckpointError(
            f"the checkpoint {directory} is incomplete: shard file(s) truncated: {', '.join(short[:4])}; "
            "copy the complete directory or save again"
        )
