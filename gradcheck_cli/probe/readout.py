"""Device tensors read back in one go: each one added with how it reduces across ranks (distributed.py), reduced
once per kind when the model is distributed, then copied to the host with one synchronisation per device.
``probe`` and ``watch`` read their numbers this way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradcheck_cli.distributed.reduce import ACT_MAX, ACT_NORM, NONE, Sharding, reduce_pieces, summed_over_ranks


def to_host(tensors: list[torch.Tensor]) -> list[float]:
    """Every element of ``tensors``, flattened in order, with one synchronisation per device.

    Models on one device (the usual case) cost exactly one device-to-host copy.
    """
    by_device: dict[torch.device, list[int]] = {}
    for index, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(index)
    chunks: list[list[float]] = [[] for _ in tensors]
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.float64) for i in indices]).tolist()
        start = 0
        for i in indices:
            end = start + tensors[i].numel()
            chunks[i] = flat[start:end]
            start = end
    return [value for chunk in chunks for value in chunk]


class Readout:
    """The tensors to read, in order, and each one's kind of reduction."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []
        self.kinds: list[str] = []

    def add(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        self.pieces.extend(tensors)
        self.kinds.extend([kind] * len(tensors))

    def add_activation_gradients(self, recorder: Any, sharding: Sharding | None) -> int:
        """(L2, max) of every output gradient the recorder holds, call by call; an output broadcast over the
        batch comes already summed over ranks. Returns how many pairs were added."""
        shared = summed_over_ranks(recorder, sharding)
        count = 0
        for call_id, call in enumerate(recorder.norms):
            for k, pair in enumerate(call):
                summed = (call_id, k) in shared  # already the whole batch's: nothing more to reduce
                l2, peak = shared.get((call_id, k), pair)
                self.add([l2], NONE if summed else ACT_NORM)
                self.add([peak], NONE if summed else ACT_MAX)
                count += 1
        return count

    def read(self, sharding: Sharding | None) -> Values:
        """Reduce across ranks (when distributed), then one copy to the host."""
        pieces = self.pieces
        if sharding is not None and pieces:
            pieces = reduce_pieces(pieces, self.kinds, sharding)
        return Values(to_host(pieces) if pieces else [])


class Values:
    """The host copies, taken in the order they were added."""

    def __init__(self, values: list[float]) -> None:
        self._values = values
        self._cursor = 0

    def take(self, count: int) -> list[float]:
        out = self._values[self._cursor : self._cursor + count]
        self._cursor += count
        return out
