"""The storages a legacy (non-zip) ``torch.save`` file declares, read from its pickle without running it.

A legacy file is four pickles (magic number, protocol, system info, the object) followed by the raw
storages. Each storage appears in the object's pickle as a persistent id ``('storage', type, key, location,
numel[, view])``; many tensors may share one key (a cuDNN-trained LSTM saves its weights as views into one
flat buffer). Summing ``numel × element size`` over distinct keys gives what torch will allocate, before
it allocates anything. Nothing in the pickle is imported or called: every global resolves to an inert
placeholder that only records its name.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

_HEADER_PICKLES = 3  # magic number, protocol version, system info
_ELEMENT_BYTES = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QUInt8": 1, "QInt8": 1, "QInt32": 4, "QUInt4x2": 1,
    "Untyped": 1,
}  # fmt: skip


class _Inert:
    """Stands for any global and anything built from it: records its name, accepts every pickle operation."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(self.name)

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageRecorder(pickle.Unpickler):
    def __init__(self, handle: IO[bytes]) -> None:
        super().__init__(handle)
        self.storages: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        return _Inert(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], str(pid[2]), pid[4]
            kind = getattr(storage_type, "name", "").rsplit(".", 1)[-1].removesuffix("Storage")
            if isinstance(numel, int) and numel >= 0:
                self.storages[key] = numel * _ELEMENT_BYTES.get(kind, 1)
        return _Inert("storage")


def declared_storage_bytes(path: Path) -> int | None:
    """Bytes of the distinct storages ``path`` declares; None when the file is not a legacy torch pickle
    this reader understands (the real load then says what it is)."""
    try:
        with path.open("rb") as handle:
            for _ in range(_HEADER_PICKLES):
                _StorageRecorder(handle).load()
            recorder = _StorageRecorder(handle)
            recorder.load()
    except Exception:  # damaged, truncated, or not a legacy torch file
        return None
    return sum(recorder.storages.values())
