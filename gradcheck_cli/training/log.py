"""The JSON-lines history ``watch`` writes and ``gradcheck history`` reads.

One header line starts each run (a file written by several runs holds several; the reader takes the
last), then one line per recorded step, each flushed as it is written so a crash loses at most the
line being written. A truncated last line is skipped on reading. NaN and ±Inf, which JSON cannot
hold, are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.parsing import MalformedDocument, loads_json
from gradcheck_cli.probe.results import LayerMeasure, LossChoice, Norm, ProbeResult

TRAINING_LOSS = LossChoice("training", "the training loop's own loss")


@dataclass(frozen=True)
class StepLog:
    """One recorded training step: its measurements in ``inspect``'s types, and what only a step has."""

    step: int
    measure: ProbeResult
    """The layers (every gradient number unscaled), the calls of one micro-batch in forward order, the loss and
    whether the output was finite: what ``inspect``'s rules read (:func:`step_measure`)."""
    micro_batches: int
    loss: float | None
    scale: float | None
    """The loss scale every gradient number was divided by (GradScaler); None without one."""
    output_max: float | None
    """max |element| of the model's own output (None when the root module was never called)."""
    first_non_finite: str | None = None
    """The module where NaN/Inf appeared first: forward order, then backward order, then parameters."""
    first_non_finite_stage: str | None = None
    """``forward``, ``backward`` or ``parameter``: which of the three found it."""
    loss_non_finite_step: int | None = None
    """The first step since the previous record whose loss (given to ``step()``) was NaN/Inf."""
    unique_total: float | None = None
    """‖∂L/∂θ‖ with every parameter counted once (a tied embedding and output layer share one)."""

    @property
    def layers(self) -> tuple[LayerMeasure, ...]:
        """Every module that owns parameters, in ``named_modules()`` order."""
        return self.measure.layers

    @property
    def total_norm(self) -> float:
        """‖∂L/∂θ‖ over every parameter once: what ``clip_grad_norm_`` compares with ``max_norm``."""
        if self.unique_total is not None:
            return self.unique_total
        return math.sqrt(sum(layer.grad.l2**2 for layer in self.layers if layer.grad is not None))


def step_measure(
    layers: tuple[LayerMeasure, ...],
    call_order: tuple[tuple[int, int], ...],
    activation_hooks: bool,
    *,
    loss: float | None,
    output_max: float | None,
) -> ProbeResult:
    """A step's measurements as the rules read them: trained in train mode on the loop's own loss (0 when
    ``step()`` got none and the output was finite, so only a non-finite output reads as a broken forward)."""
    output_finite = output_max is None or math.isfinite(output_max)
    loss_value = loss if loss is not None else (0.0 if output_finite else math.nan)
    return ProbeResult(layers, call_order, activation_hooks, TRAINING_LOSS, loss_value, "train", output_finite)


FORMAT = "gradcheck-history"
VERSION = 1


class HistoryError(GradcheckError):
    """A history file that cannot be read."""


@dataclass(frozen=True)
class Header:
    """What a run recorded: the model, how often, and what could be measured."""

    model: str
    parameters: int
    every: int
    activation_hooks: bool
    scaler: bool
    notes: tuple[str, ...] = ()
    started: str = ""
    gradcheck_version: str = ""
    torch_version: str = ""


@dataclass(frozen=True)
class History:
    """The last run of a history file."""

    header: Header
    records: tuple[StepLog, ...]
    verdicts: tuple[dict[str, Any], ...] = ()
    """What ``watch`` concluded live for each record (status, problems), as written."""
    earlier_runs: int = 0
    skipped_lines: int = 0
    """Lines that could not be read (a crash mid-write truncates the last one)."""
    source: str = ""
    extra_notes: tuple[str, ...] = field(default_factory=tuple)
    tail_non_finite_step: int | None = None
    """The loss was NaN/Inf at this step, after the last record (written when the watch closed)."""


def _number(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return float(value)  # "nan", "inf", "-inf"
    return float(value)


def _pair(norm: Norm | None) -> list[float | str | None] | None:
    return None if norm is None else [_number(norm.l2), _number(norm.max_abs)]


def _read_pair(value: Any) -> Norm | None:
    if value is None:
        return None
    a, b = (_float(v) for v in value)
    return Norm(a if a is not None else math.nan, b if b is not None else math.nan)


def header_line(header: Header) -> str:
    entry = {
        "kind": "header",
        "format": FORMAT,
        "version": VERSION,
        "model": header.model,
        "parameters": header.parameters,
        "every": header.every,
        "activation_gradients": header.activation_hooks,
        "grad_scaler": header.scaler,
        "notes": list(header.notes),
        "started": header.started,
        "gradcheck_version": header.gradcheck_version,
        "torch_version": header.torch_version,
    }
    return json.dumps(entry, allow_nan=False)


def record_line(log: StepLog, verdict: dict[str, Any]) -> str:
    entry = {
        "kind": "record",
        "step": log.step,
        "loss": _number(log.loss),
        "loss_scale": _number(log.scale),
        "total_norm": _number(log.total_norm),
        "micro_batches": log.micro_batches,
        "output_max": _number(log.output_max),
        "first_non_finite": log.first_non_finite,
        "first_non_finite_stage": log.first_non_finite_stage,
        "loss_non_finite_step": log.loss_non_finite_step,
        **{k: _number(v) if isinstance(v, float) else v for k, v in verdict.items()},
        "order": [layer for layer, _ in log.measure.call_order],
        "activation_gradients": log.measure.activation_hooks,
        "layers": [
            {
                "name": layer.name,
                "type": layer.type,
                "params": layer.params,
                "frozen": layer.frozen,
                "weight_norm": _number(layer.weight_norm),
                "grad": _pair(layer.grad),
                "calls": [_pair(c) for c in layer.calls],
                "output_max": _number(layer.output_max),
            }
            for layer in log.layers
        ],
    }
    return json.dumps(entry, allow_nan=False)


class HistoryWriter:
    """Appends lines to the history file, flushing each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def open(self, header: Header) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._write(header_line(header))

    def reopen(self) -> None:
        """Continue the same run (the same Watch entered again): no new header."""
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, log: StepLog, verdict: dict[str, Any]) -> None:
        self._write(record_line(log, verdict))

    def write_tail(self, step: int) -> None:
        """The loss went NaN/Inf after the last record (read when the watch closed)."""
        self._write(json.dumps({"kind": "tail", "loss_non_finite_step": step}))

    def _write(self, line: str) -> None:
        if self._file is None:
            return
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_history(path: Path) -> History:
    """The last run in the file; a clear error when it holds none."""
    if not path.exists():
        raise HistoryError(f"{path} does not exist; pass the file given to watch(log=...)")
    if path.is_dir():
        raise HistoryError(f"{path} is a directory; pass the .jsonl file given to watch(log=...)")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise HistoryError(f"{path} is not a regular file; pass the .jsonl file given to watch(log=...)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HistoryError(f"cannot read {path} ({type(exc).__name__}); pass the JSON-lines file watch wrote") from None
    runs: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = loads_json(line)
        except MalformedDocument:
            skipped += 1
            continue
        if not isinstance(entry, dict):
            skipped += 1
            continue
        if entry.get("kind") == "header" and entry.get("format") == FORMAT:
            runs.append((entry, []))
        elif entry.get("kind") in ("record", "tail") and runs:
            runs[-1][1].append(entry)
        else:
            skipped += 1
    if not runs:
        raise HistoryError(
            f"{path} is not a gradcheck history (no header line); write one with "
            "`with gradcheck_cli.watch(model, log=...)`"
        )
    head, entries = runs[-1]
    try:
        header = _header(head)
    except (TypeError, ValueError):
        raise HistoryError(
            f"{path}: the header line of the last run is damaged; write the log again with watch()"
        ) from None
    if header_version(head) > VERSION:
        raise HistoryError(f"{path} was written by a newer gradcheck (history version {head['version']}); upgrade")
    records: list[StepLog] = []
    verdicts: list[dict[str, Any]] = []
    tail = None
    for entry in entries:
        if entry.get("kind") == "tail":
            value = entry.get("loss_non_finite_step")
            tail = int(value) if isinstance(value, int) else tail
            continue
        try:
            records.append(_record(entry))
        except (KeyError, TypeError, ValueError):
            skipped += 1
            continue
        verdicts.append({"status": entry.get("status"), "problems": entry.get("problems", [])})
    if not records and tail is None:
        raise HistoryError(
            f"{path} holds no recorded step yet: watch() writes the first record at the first recorded w.step()"
        )
    return History(
        header, tuple(records), tuple(verdicts), len(runs) - 1, skipped, str(path), tail_non_finite_step=tail
    )


def header_version(head: dict[str, Any]) -> int:
    version = head.get("version", VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise HistoryError(f"the history header's version {version!r} is not a number; write the log again")
    return version


def _header(head: dict[str, Any]) -> Header:
    every = head.get("every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError("every")
    return Header(
        model=str(head.get("model", "?")),
        parameters=int(head.get("parameters", 0)),
        every=every,
        activation_hooks=bool(head.get("activation_gradients", True)),
        scaler=bool(head.get("grad_scaler", False)),
        notes=tuple(str(n) for n in head.get("notes", [])),
        started=str(head.get("started", "")),
        gradcheck_version=str(head.get("gradcheck_version", "")),
        torch_version=str(head.get("torch_version", "")),
    )


def _record(entry: dict[str, Any]) -> StepLog:
    layers = tuple(
        LayerMeasure(
            name=str(layer["name"]),
            type=str(layer["type"]),
            params=int(layer["params"]),
            frozen=bool(layer["frozen"]),
            weight_norm=_float(layer["weight_norm"]) or 0.0,
            grad=_read_pair(layer["grad"]),
            calls=tuple(_read_pair(c) for c in layer["calls"]),
            output_max=_float(layer.get("output_max")),
        )
        for layer in entry["layers"]
    )
    order = [int(i) for i in entry["order"]]
    if any(i < 0 or i >= len(layers) for i in order):
        raise ValueError("call order names a layer that is not there")
    seen = [0] * len(layers)
    call_order = []
    for layer in order:  # the log keeps the layer of each call; its index among that layer's calls follows
        call_order.append((layer, seen[layer]))
        seen[layer] += 1
    sentinel = entry.get("loss_non_finite_step")
    loss, output_max = _float(entry.get("loss")), _float(entry.get("output_max"))
    hooks = bool(entry.get("activation_gradients", True))
    return StepLog(
        step=int(entry["step"]),
        measure=step_measure(layers, tuple(call_order), hooks, loss=loss, output_max=output_max),
        micro_batches=int(entry.get("micro_batches", 1)),
        loss=loss,
        scale=_float(entry.get("loss_scale")),
        output_max=output_max,
        first_non_finite=entry.get("first_non_finite"),
        first_non_finite_stage=entry.get("first_non_finite_stage"),
        loss_non_finite_step=None if sentinel is None else int(sentinel),
        unique_total=_float(entry.get("total_norm")),
    )


def steps_of(records: Sequence[StepLog]) -> list[int]:
    return [r.step for r in records]
