"""The device-side checks of the NaN/Inf locator (nonfinite.py): one ``aminmax`` per tensor at a module
boundary, cached per tensor and version, read on the host in chunks without stalling the device; the
summaries of the culprit's tensors, reduced on the device."""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

CallId = tuple[int, int]
"""(index of the hooked module, call number of that module, from 0)."""

Kept = list[tuple[torch.Tensor, int | None]]
"""Tensors referenced while a flag is in flight, with their version counters at the time."""


def _dense(t: torch.Tensor) -> torch.Tensor | None:
    """The elements to look at: a sparse tensor's stored values; None for layouts we cannot reduce."""
    if t.requires_grad:
        t = t.detach()
    if t.layout == torch.strided and not t.is_nested:
        return t
    return t._values() if t.is_sparse else None


def non_finite_flag(t: torch.Tensor, *, mask_ok: bool = True) -> torch.Tensor:
    """0-dim bool on ``t``'s device: whether ``t`` holds NaN/Inf. No sync.

    One ``aminmax`` (NaN propagates into both ends; far cheaper than ``isfinite().all()`` on CPU).
    With ``mask_ok`` a tensor holding only 0 and -inf, an additive attention mask such as
    ``nn.Transformer.generate_square_subsequent_mask``, does not count (one more pass).
    """
    x = _dense(t)
    if x is None or x.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    low, high = torch.aminmax(x)
    bad = ~((low > -torch.inf) & (high < torch.inf))
    if mask_ok:
        bad = bad & ~((x == 0) | torch.isneginf(x)).all()
    return bad


@dataclass(frozen=True)
class Pending:
    """A :class:`TensorSummary` whose numbers are still on the device."""

    shape: tuple[int, ...]
    counts: torch.Tensor
    """int64 [NaN count, Inf count, finite count]."""
    values: torch.Tensor
    """float32 [finite min, finite max, finite mean |x|]."""


def summarise(t: torch.Tensor) -> Pending:
    """NaN/Inf counts and the range of the finite elements, reduced on the device without a sync."""
    shape = tuple(t.shape)
    x = _dense(t)
    if x is None or x.numel() == 0:
        zero = torch.zeros(3, dtype=torch.int64, device=t.device)
        return Pending(shape, zero, torch.zeros(3, device=t.device))
    x = x.reshape(-1)
    finite = torch.isfinite(x)
    count = finite.sum()
    counts = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum(), count])
    low = torch.where(finite, x, torch.inf).amin().float()
    high = torch.where(finite, x, -torch.inf).amax().float()
    mean = torch.where(finite, x.abs(), 0).sum(dtype=torch.float32) / count.clamp(min=1)
    return Pending(shape, counts, torch.stack([low, high, mean]))


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter (nor can they change in place later)
        return None


def with_versions(tensors: Iterable[torch.Tensor]) -> Kept:
    return [(t, _version(t)) for t in tensors]


def untouched(kept: Kept) -> bool:
    """No in-place op has run on any of these tensors since they were kept."""
    return all(_version(t) == version for t, version in kept)


Record = list[torch.Tensor]
"""What the host needs to judge one tensor: [min, max] (NaN propagates into both), and for a tensor
met as an input, a third value: whether it is an additive mask (only 0 and -inf). 0-dim device tensors."""


def _record(t: torch.Tensor, *, mask_ok: bool) -> Record | None:
    """One ``aminmax`` (one kernel; no combining op: the host reads both ends), None for an empty tensor."""
    x = _dense(t)
    if x is None or x.numel() == 0:
        return None
    low, high = torch.aminmax(x)
    if not mask_ok:
        return [low, high]
    return [low, high, ((x == 0) | torch.isneginf(x)).all()]


def _judged_finite(values: list[float]) -> bool:
    """A record read on the host: finite at both ends, or an additive mask."""
    return (math.isfinite(values[0]) and math.isfinite(values[1])) or (len(values) == 3 and values[2] == 1.0)


class RecordCache:
    """:func:`_record` once per tensor and version: one module's output is the next one's input.

    A tensor is judged as it is first met: as a module's output strictly, as an input (the batch, or
    a tensor made by a functional op) with the attention-mask exception.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, Record | None]] = {}

    def of(self, t: torch.Tensor, *, mask_ok: bool) -> Record | None:
        version = _version(t)
        hit = self._seen.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        record = _record(t, mask_ok=mask_ok)
        if version is not None:
            self._seen[id(t)] = (weakref.ref(t), version, record)
        return record

    def all(self, tensors: Iterable[torch.Tensor], *, mask_ok: bool) -> list[Record]:
        return [r for t in tensors if (r := self.of(t, mask_ok=mask_ok)) is not None]


CHUNK = 16
"""Entries whose values travel to the host together: one stack, one copy (on CUDA non-blocking, one event)."""


class FirstNonFinite:
    """The first entry, in the order offered, whose outputs hold NaN/Inf while its inputs do not.

    Values are read on the host in order, in chunks of :data:`CHUNK` entries, without stalling the
    device: on CUDA a chunk is copied to pinned memory without blocking and read once its event has
    passed (polled whenever another chunk leaves); on CPU it is read at once. Whatever is offered
    with an entry is held only until the entry is judged; ``on_found`` gets it for the first culprit.
    Once that is known, later offers are ignored.
    """

    def __init__(self, on_found: Callable[[Any], None]) -> None:
        self._on_found = on_found
        self._entries: list[tuple[CallId, list[int], list[int], Any]] = []
        self._values: list[torch.Tensor] = []
        self._pending: deque[tuple[list[tuple[CallId, list[int], list[int], Any]], torch.Tensor, Any]] = deque()
        self.found: CallId | None = None
        self.done = False

    def offer(self, call: CallId, outputs: list[Record], inputs: list[Record], keep: Any = None) -> None:
        if self.done:
            return
        self._entries.append((call, [len(r) for r in outputs], [len(r) for r in inputs], keep))
        for record in outputs:
            self._values += record
        for record in inputs:
            self._values += record
        if len(self._entries) >= CHUNK:
            self._flush()
            self._drain(block=False)

    def finish(self) -> None:
        """Judge every entry still in flight (a blocking wait on CUDA)."""
        self._flush()
        self._drain(block=True)

    def _flush(self) -> None:
        if not self._entries or self.done:
            return
        device = self._values[0].device
        flat = torch.stack([v if v.device == device else v.to(device) for v in self._values])
        event = None
        if flat.is_cuda:
            # the stream named by an indexed device: without one, torch asks the driver for the
            # device count on every call (about 0.3 ms on a virtual machine)
            stream = torch.cuda.current_stream(device)
            flat = flat.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self._pending.append((self._entries, flat, event))
        self._entries, self._values = [], []

    def _drain(self, block: bool) -> None:
        while self._pending and not self.done:
            entries, flat, event = self._pending[0]
            if event is not None and not event.query():
                if not block:
                    return
                event.synchronize()
            self._pending.popleft()
            values = flat.tolist()
            at = 0
            for call, outputs, inputs, keep in entries:
                judged = []
                for size in outputs + inputs:
                    judged.append(_judged_finite(values[at : at + size]))
                    at += size
                if not all(judged[: len(outputs)]) and all(judged[len(outputs) :]):
                    self.found = call
                    self.done = True
                    self._pending.clear()
                    self._entries, self._values = [], []
                    self._on_found(keep)
                    return
