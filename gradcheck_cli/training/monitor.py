"""Watch the gradients a training loop already computes: ``with watch(model, every=50) as w: ... w.step()``.

Hooks exist only for recorded steps: armed when the previous step ends (or on entering the block),
read and removed by that step's ``w.step()``. Between records, ``step()`` counts, and when given a loss
tensor it keeps one device-side flag of the first step whose loss was NaN/Inf (no synchronisation).
Each record is judged by the same rules as ``inspect`` plus the rules over time (history_rules.py),
appended to the JSON-lines log, and acted on by ``on_problem``.
"""

from __future__ import annotations

import collections
import datetime
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradcheck_cli.diagnose.rule_codes import TRAINING_LOSS_NON_FINITE
from gradcheck_cli.diagnose.rules import Thresholds
from gradcheck_cli.distributed.reduce import FIRST, reduce_pieces
from gradcheck_cli.distributed.reduce import data_parallel as replica
from gradcheck_cli.distributed.reduce import detect as detect_sharding
from gradcheck_cli.probe.modules import module_type, parametrised_modules, supports_module_hooks, unwrap
from gradcheck_cli.report.report import Problem, Severity
from gradcheck_cli.training.hooks import StepRecorder
from gradcheck_cli.training.log import Header, HistoryWriter, StepLog
from gradcheck_cli.training.rules import STOPPING, Assessment, Baseline, advance, assess
from gradcheck_cli.version import __version__

POLICIES = ("warn", "raise", "stop")
KEEP = 1000
"""Assessments kept in memory; a long run at every=1 would otherwise grow without bound."""


class GradientWarning(UserWarning):
    """``on_problem='warn'``: a recorded step showed a gradient problem."""


class GradientProblemError(RuntimeError):
    """``on_problem='raise'``: a recorded step showed NaN/Inf or exploding gradients."""

    def __init__(self, message: str, assessment: Assessment) -> None:
        super().__init__(message)
        self.assessment = assessment


class StopTraining(Exception):
    """``on_problem='stop'``: raised by ``step()`` and swallowed by the ``with`` block, which ends cleanly."""


def check_arguments(every: object, on_problem: object) -> None:
    """``every`` a positive int and ``on_problem`` one of :data:`POLICIES`, else a ValueError saying so."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int (record every N-th step), not {every!r}")
    if on_problem not in POLICIES:
        raise ValueError(f"on_problem must be one of {', '.join(POLICIES)}, not {on_problem!r}")


def compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps the model or any submodule (module hooks would force recompiles)."""
    if type(model).__name__ == "OptimizedModule":
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _eager(model: nn.Module) -> nn.Module:

    return unwrap(model)


class Watch:
    """The monitor; use :func:`watch` to make one."""

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 50,
        log: str | Path | None = None,
        on_problem: str = "warn",
        scaler: Any = None,
        thresholds: Thresholds | None = None,
        start: int = 0,
        stop: Callable[[Assessment], None] | None = None,
        data_parallel: bool = False,
    ) -> None:
        assume_data_parallel = data_parallel
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module, not {type(model).__name__}")
        check_arguments(every, on_problem)
        self.sharding = detect_sharding(model) or (replica() if assume_data_parallel else None)
        """DDP/FSDP2 inside a process group: every rank records, the numbers are reduced across ranks."""
        self.model = _eager(model)
        self.every = every
        self.on_problem = on_problem
        self.scaler = scaler
        self.thresholds = thresholds
        self.compiled = compiled(model)
        self.activation_hooks = supports_module_hooks(self.model) and not self.compiled
        self.log_path = None if log is None else Path(log)
        self.notes = self._notes()
        self.records: collections.deque[Assessment] = collections.deque(maxlen=KEEP)
        """The last ``KEEP`` recorded steps' assessments, in order (the log file keeps them all)."""
        self.onsets: dict[Problem, int] = {}
        """The first recorded step showing each problem."""
        self.should_stop = False
        """Set when ``on_problem='stop'`` met NaN/Inf or exploding gradients."""
        self._step = start
        self._named = parametrised_modules(self.model)
        self._recorder: StepRecorder | None = None
        self._baseline = Baseline()
        writes = self.log_path is not None and (self.sharding is None or self.sharding.rank == 0)
        self._writer = HistoryWriter(self.log_path) if writes and self.log_path is not None else None
        self._sentinel: torch.Tensor | None = None
        self._stop = stop
        self._entered = False
        self._opened = False

    # ------------------------------------------------------------------ the block

    def __enter__(self) -> Watch:
        if self._writer is not None and not self._opened:
            self._writer.open(self._header())  # once per Watch: entering it again (each epoch) continues the run
            self._opened = True
        elif self._writer is not None:
            self._writer.reopen()
        self._entered = True
        self._arm_if_recorded(self._step)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        # an error on this rank alone must not start a collective the others never join
        symmetric = exc_type is None or issubclass(exc_type, (StopTraining, GradientProblemError))
        self.close(failed=not symmetric)
        return exc_type is not None and issubclass(exc_type, StopTraining)

    def close(self, *, failed: bool = False) -> None:
        """Remove every hook and close the log (the ``with`` block does this on exit).

        A NaN/Inf loss after the last record (a loop that breaks on it) is read here, logged and warned about;
        under a process group every rank reduces it together, unless ``failed`` (closing because of an error
        on this rank): then it is read locally, without a collective.
        """
        self._disarm()
        try:
            if self._entered:
                self._tail(collective=not failed)
        finally:
            if self._writer is not None:
                self._writer.close()
            self._entered = False

    def _tail(self, *, collective: bool) -> None:
        sentinel, self._sentinel = self._sentinel, None
        if self.sharding is not None and collective:  # every rank takes part, with -1 when it saw no NaN
            mine = torch.full((1,), -1.0) if sentinel is None else sentinel.reshape(1).double()
            sentinel = reduce_pieces([mine], [FIRST], self.sharding)[0]
        if sentinel is None:
            return
        first = int(sentinel.reshape(-1)[0].item())
        if first < 0:
            return
        if self._writer is not None:
            self._writer.write_tail(first)
        if Problem.NON_FINITE not in self.onsets:
            self.onsets[Problem.NON_FINITE] = first
            warnings.warn(
                f"gradcheck: the loss was NaN/Inf at step {first}, after the last recorded step", GradientWarning, 3
            )

    @property
    def armed(self) -> bool:
        """Whether hooks are registered now (only between a recorded step's start and its ``step()``)."""
        return self._recorder is not None

    @property
    def next_step(self) -> int:
        """The index the next call of ``step()`` will have."""
        return self._step

    def recorded(self, step: int) -> bool:
        """Whether ``step`` is one this watch records."""
        return step % self.every == 0

    # ------------------------------------------------------------------ each step

    def step(self, loss: torch.Tensor | float | None = None, *, step: int | None = None) -> Assessment | None:
        """Call once per optimiser step, after backward (and any accumulation), before ``optimizer.step()``.

        ``loss`` (unscaled: the loss before ``scaler.scale``) is recorded at recorded steps; between them a
        loss tensor only updates a device-side NaN/Inf flag. ``step`` overrides the internal counter (a
        Lightning or HF global step). Returns the assessment when this step was recorded, else None.
        """
        if not self._entered:
            raise RuntimeError("call step() inside `with watch(model) as w:`")
        index = self._step if step is None else step
        self._watch_loss(loss, index)
        result = None
        if self._recorder is not None:
            log = self._read(index, loss)
            result = self._judge(log)
        self._step = index + 1
        self._arm_if_recorded(self._step)
        if result is not None:
            self._react(result)
        return result

    def arm_for(self, step: int) -> None:
        """Set the index of the coming step (integrations call this before its forward) and arm if recorded."""
        if self._recorder is not None and step == self._step:
            return
        self._disarm()
        self._step = step
        self._arm_if_recorded(step)

    # ------------------------------------------------------------------ internals

    def _notes(self) -> tuple[str, ...]:
        notes = []
        if self.compiled:
            notes.append(
                "torch.compile'd model: activation gradients are not measured (module hooks would force "
                "recompilation); parameter gradients, the loss and NaN/Inf are"
            )
        elif not self.activation_hooks:
            notes.append("module hooks do not fire on this model (TorchScript, torch.export): parameter gradients only")
        if scale_of(self.scaler) is not None:
            notes.append("gradient numbers are divided by the GradScaler's scale: they read unscaled")
        if self.sharding is None:
            notes.append("parameter gradients are read as backward accumulates them: before any clipping")
        else:
            notes.append(
                f"distributed ({self.sharding.mode}, {self.sharding.world} ranks): parameter gradients are read at "
                "the end of backward as the framework reduced them, before any clipping; every norm is reduced "
                "across ranks to the whole batch's; rank 0 writes the log"
            )
        return tuple(notes)

    def _header(self) -> Header:
        return Header(
            model=module_type(self.model),
            parameters=sum(p.numel() for p in self.model.parameters()),
            every=self.every,
            activation_hooks=self.activation_hooks,
            scaler=scale_of(self.scaler) is not None,
            notes=self.notes,
            started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            gradcheck_version=__version__,
            torch_version=torch.__version__,
        )

    def _arm_if_recorded(self, step: int) -> None:
        if self._recorder is None and self.recorded(step):
            recorder = StepRecorder(self.model, self._named, self.activation_hooks, self.sharding)
            recorder.__enter__()
            self._recorder = recorder

    def _disarm(self) -> None:
        if self._recorder is not None:
            recorder, self._recorder = self._recorder, None
            recorder.__exit__(None, None, None)

    def _watch_loss(self, loss: torch.Tensor | float | None, index: int) -> None:
        """Between records: remember the first step whose loss was NaN/Inf, on the device, without a sync."""
        if loss is None:
            return
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        with torch.no_grad():
            bad = ~torch.isfinite(loss.detach()).all()
            if self._sentinel is None:
                self._sentinel = torch.full((), -1, dtype=torch.int64, device=loss.device)
            fresh = bad & (self._sentinel < 0)
            self._sentinel = torch.where(fresh, torch.full_like(self._sentinel, index), self._sentinel)

    def _scale(self) -> torch.Tensor | float | None:
        return scale_of(self.scaler)

    def _param_grads_scaled(self) -> bool:
        """Whether the parameter gradients read now still carry the loss scale. Hooks read them during
        backward (scaled); under DDP/FSDP they are read at ``step()``, after a ``scaler.unscale_`` if any."""
        if self.sharding is None:
            return True
        states = getattr(self.scaler, "_per_optimizer_states", None) or {}
        done = ("UNSCALED", "STEPPED")  # scaler.unscale_() (or scaler.step()) has divided the scale out
        return not any(getattr(state.get("stage"), "name", "") in done for state in states.values())

    def _read(self, index: int, loss: torch.Tensor | float | None) -> StepLog:
        recorder = self._recorder
        assert recorder is not None
        self._recorder = None
        try:
            log = recorder.read(index, loss, self._scale(), self._sentinel, param_scaled=self._param_grads_scaled())
        finally:
            recorder.__exit__(None, None, None)
        self._sentinel = None
        return log

    def _judge(self, log: StepLog) -> Assessment:
        assessment = assess(log, self._baseline, scaler=log.scale is not None, thresholds=self.thresholds)
        advance(self._baseline, log, assessment)
        self.records.append(assessment)
        if self._writer is not None:
            self._writer.write(log, verdict(assessment))
        return assessment

    def _react(self, assessment: Assessment) -> None:
        new = [p for p in assessment.problems if p not in self.onsets]
        for problem in new:  # dated as history dates it: a NaN loss's exact step, a divergence's first record
            earlier = [
                int(f.evidence[key])
                for f in assessment.findings
                if f.problem is problem and f.severity is Severity.ERROR
                for key in ("from_step", "step")
                if isinstance(f.evidence.get(key), int)
                and (key == "from_step" or f.code == TRAINING_LOSS_NON_FINITE.code)
            ]
            self.onsets[problem] = min([assessment.step, *earlier])
        if not new:
            return
        message = describe(assessment)
        acting = any(p in STOPPING for p in assessment.problems)
        if self.on_problem == "warn" or not acting:
            warnings.warn(message, GradientWarning, stacklevel=3)
            return
        if self.on_problem == "raise":
            raise GradientProblemError(message, assessment)
        self.should_stop = True
        if self._stop is not None:
            self._stop(assessment)
            return
        raise StopTraining(message)


def scale_of(scaler: Any) -> torch.Tensor | float | None:
    """The loss scale of an enabled GradScaler (its device tensor when it has one), else None."""
    if scaler is None or (hasattr(scaler, "is_enabled") and not scaler.is_enabled()):
        return None
    tensor = getattr(scaler, "_scale", None)
    if isinstance(tensor, torch.Tensor):
        return tensor
    return float(scaler.get_scale())


def verdict(assessment: Assessment) -> dict[str, Any]:
    """The live conclusion written beside each record."""
    path = assessment.diagnosis.path
    return {
        "status": "unhealthy" if assessment.problems else "healthy",
        "problems": [p.value for p in assessment.problems],
        "gain": path.gain,
        "attenuation": path.attenuation,
        "reference_norm": assessment.reference,
        "findings": [
            {"code": f.code, "severity": f.severity.value, "layer": f.layer, "message": f.message}
            for f in assessment.findings
            if f.severity is not Severity.INFO
        ],
    }


def describe(assessment: Assessment) -> str:
    """One line for a warning or an exception: the step, the problems and the first error finding."""
    first = next((f for f in assessment.findings if f.severity is Severity.ERROR), None)
    problems = ", ".join(p.value for p in assessment.problems)
    detail = f" — {first.code} {first.message}" if first else ""
    return f"gradcheck: step {assessment.step}: {problems} gradients{detail}"


def watch(
    model: nn.Module,
    *,
    every: int = 50,
    log: str | Path | None = None,
    on_problem: str = "warn",
    scaler: Any = None,
    thresholds: Thresholds | None = None,
    start: int = 0,
    data_parallel: bool = False,
) -> Watch:
    """Watch ``model``'s gradients inside a training loop, every ``every``-th step.

    ``log``: a JSON-lines file to append one record per recorded step to (``gradcheck history`` reads
    it). ``on_problem``: ``warn`` (a :class:`GradientWarning`, default), ``raise``
    (:class:`GradientProblemError`) or ``stop`` (ends the ``with`` block cleanly) at the first record
    with NaN/Inf or exploding gradients. ``scaler``: the ``torch.amp.GradScaler`` the loop uses, so
    norms read unscaled. ``start``: the index of the first step (when resuming). ``data_parallel``: inside a
    process group, take an unwrapped module as one DDP replica (every rank must then call ``step()``); a DDP- or
    FSDP2-wrapped model is recognised without it.
    """
    return Watch(
        model, every=every, log=log, on_problem=on_problem, scaler=scaler, thresholds=thresholds, start=start,
        data_parallel=data_parallel,
    )  # fmt: skip
