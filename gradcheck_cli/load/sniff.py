"""Recognise a checkpoint's kind by its content, never by its file name."""

from __future__ import annotations

import struct
import zipfile
from enum import Enum
from pathlib import Path

from gradcheck_cli.errors import CheckpointError
from gradcheck_cli.load.limits import refuse_special_members, require_regular_file
from gradcheck_cli.load.sizes import check_zip_directory
from gradcheck_cli.parsing import MalformedDocument, loads_json

LFS_POINTER = b"version https://git-lfs.github.com/spec/"
PICKLE_PROTOCOL = b"\x80"
"""Legacy (non-zip) torch files are a sequence of pickles, each starting with the PROTO opcode."""
SAFETENSORS_MAX_HEADER = 100_000_000
DCP_METADATA = ".metadata"
"""The pickled global metadata of a ``torch.distributed.checkpoint`` directory, written last by rank 0."""
DCP_SHARD_SUFFIX = ".distcp"
"""The shard files of a DCP directory (``__<rank>_<n>.distcp``), one or more per rank."""


class Kind(str, Enum):
    """The checkpoint formats gradcheck reads."""

    TORCH_ZIP = "torch_zip"
    """``torch.save`` (zip): a state_dict, a training dict or a pickled module."""
    TORCH_LEGACY = "torch_legacy"
    """``torch.save(..., _use_new_zipfile_serialization=False)``: the same, as plain pickles."""
    TORCHSCRIPT = "torchscript"
    EXPORTED = "exported_program"
    """``torch.export.save``: a ``.pt2`` archive."""
    SAFETENSORS = "safetensors"
    HF_DIRECTORY = "huggingface"
    """A Hugging Face ``save_pretrained`` directory (``config.json`` + weights)."""
    DCP = "dcp"
    """A ``torch.distributed.checkpoint`` directory (``.metadata`` + ``*.distcp`` shards)."""


def sniff(path: Path) -> Kind:
    """The kind of checkpoint at ``path``; :class:`CheckpointError` with one line when it is none."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        refuse_special_members(path, CheckpointError)  # a FIFO config.json or shard would hang the reader
        if _is_dcp_directory(path):
            return Kind.DCP
        if (path / "config.json").is_file():
            return Kind.HF_DIRECTORY
        raise CheckpointError(
            f"{path} is a directory without config.json or DCP .metadata; pass a checkpoint file, a Hugging Face "
            "save_pretrained directory or a torch.distributed.checkpoint directory"
        )
    require_regular_file(path, CheckpointError, "checkpoint")  # before opening: a FIFO would block open()
    try:
        with path.open("rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes); was the checkpoint written completely?")
    if head.startswith(LFS_POINTER):
        raise CheckpointError(f"{path} is a git-LFS pointer, not the checkpoint; run `git lfs pull` first")
    if head.startswith(b"PK"):
        check_zip_directory(path, what="checkpoint", error=CheckpointError)  # before zipfile lists every entry
        return _zip_kind(path)
    if head.startswith(PICKLE_PROTOCOL):
        return Kind.TORCH_LEGACY
    if _is_safetensors(path, head):
        return Kind.SAFETENSORS
    raise CheckpointError(
        f"{path} is not a PyTorch checkpoint (not a torch zip archive, legacy torch pickle, TorchScript, "
        ".pt2 or safetensors file)"
    )


def _is_dcp_directory(path: Path) -> bool:
    """DCP shard files, or (without config.json) a pickled ``.metadata``: a DCP directory, complete or not.

    Shards without ``.metadata`` still count, so that the loader can say the save did not finish.
    """
    if any(p.is_file() for p in path.glob(f"*{DCP_SHARD_SUFFIX}")):
        return True
    metadata = path / DCP_METADATA
    if not metadata.is_file() or (path / "config.json").is_file():
        return False
    try:
        with metadata.open("rb") as handle:
            return handle.read(1) == PICKLE_PROTOCOL
    except OSError:
        return False


def _zip_kind(path: Path) -> Kind:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception as exc:  # zipfile raises BadZipFile, UnicodeDecodeError, struct.error... on damage
        raise CheckpointError(
            f"{path} is a damaged zip archive ({exc}); was it copied or written completely?"
        ) from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return Kind.TORCHSCRIPT
    exported_markers = ("/archive_format", "serialized_exported_program.json")  # the 2.7 layout has the latter
    if any(n.endswith(exported_markers) for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
        return Kind.EXPORTED
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return Kind.TORCH_ZIP
    if any(n.endswith(".npy") for n in names):
        raise CheckpointError(f"{path} is a NumPy .npz archive, not a checkpoint; pass it as --input")
    raise CheckpointError(
        f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl, code/ or archive_format)"
    )


def _is_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON object of that length."""
    if len(head) < 10:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    if not 2 <= length <= SAFETENSORS_MAX_HEADER or head[8:9] != b"{" or 8 + length > path.stat().st_size:
        return False
    with path.open("rb") as handle:
        handle.seek(8)
        header = handle.read(length)
    try:
        return isinstance(loads_json(header), dict)
    except MalformedDocument:
        return False
