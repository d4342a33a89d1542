"""Watch the gradients of a Lightning run: ``Trainer(callbacks=[GradcheckCallback(every=50, log="grads.jsonl")])``.

Needs Lightning (``pip install gradcheck[lightning]``); ``lightning.pytorch`` is used, else the older
``pytorch_lightning``.

When things happen, for automatic optimisation (Lightning 2.x):

* The hooks of a recorded step are armed in ``on_train_batch_start``, before the forward of its first
  micro-batch; later micro-batches of the same optimiser step (``accumulate_grad_batches``) leave them
  armed, so the record holds every micro-batch (``micro_batches`` in the history).
* The step is read in ``on_before_optimizer_step``: after the last backward and, under
  ``precision="16-mixed"``, after Lightning's ``scaler.unscale_``, before gradient clipping and
  ``optimizer.step()``. The parameter gradients were measured as backward accumulated them, so the
  numbers are the unclipped ones; those taken while the GradScaler's scale was applied are divided by it.
* Steps are numbered by ``trainer.global_step``: the number of optimiser steps completed before this
  one (0, 1, 2, ...), the ``step`` Lightning's own loggers use for the metrics of the same step. Step
  ``s`` is recorded when ``s % every == 0``.
* The loss recorded is the sum of the losses ``on_before_backward`` sees over the step's
  micro-batches (Lightning divides each by ``accumulate_grad_batches``, so this is their mean: the
  loss whose gradient the step applies), divided by the GradScaler's scale when one is in use.

After each record, ``gradcheck/total_norm``, ``gradcheck/gain``, ``gradcheck/attenuation`` (when the
record has them) and ``gradcheck/problems`` go to every logger of the trainer (TensorBoard, W&B, CSV,
...), at ``step=trainer.global_step``.

``on_problem``: ``warn`` (a :class:`~gradcheck_cli.training.monitor.GradientWarning`), ``raise``
(:class:`~gradcheck_cli.training.monitor.GradientProblemError` leaves ``trainer.fit``) or ``stop``
(``trainer.should_stop``: the optimiser step already begun completes, then ``fit`` returns) at the
first record with NaN/Inf or exploding gradients.

Several processes (DDP): every process watches its own gradients and applies ``on_problem`` to them;
only global rank 0 writes the history.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[assignment,no-redef]
    except ImportError:
        raise ImportError(
            "gradcheck_cli.integrations.lightning needs Lightning: pip install gradcheck[lightning]"
        ) from None

from gradcheck_cli.diagnose.rules import Thresholds
from gradcheck_cli.integrations import scalars
from gradcheck_cli.training.monitor import GradientProblemError, Watch, check_arguments, scale_of
from gradcheck_cli.training.rules import Assessment

__all__ = ["GradcheckCallback"]


class GradcheckCallback(Callback):
    """Record every ``every``-th optimiser step of ``trainer.fit`` into the history file ``log``.

    ``log``: the JSON-lines history (``gradcheck history`` reads it); None keeps the records in memory
    only (``callback.watch.records``). ``on_problem``: ``warn``, ``raise`` or ``stop``.
    ``thresholds``: as for ``gradcheck_cli.watch``.
    """

    def __init__(
        self,
        every: int = 50,
        log: str | Path | None = None,
        on_problem: str = "warn",
        thresholds: Thresholds | None = None,
    ) -> None:
        super().__init__()
        check_arguments(every, on_problem)
        self.every = every
        self.log_path = None if log is None else Path(log)
        """The history file (not ``self.log``: Lightning sets that to the module's ``log`` on every callback)."""
        self.on_problem = on_problem
        self.thresholds = thresholds
        self.watch: Watch | None = None
        """The running monitor (kept after training ends: ``.records``, ``.onsets``, ``.should_stop``)."""
        self._loss: torch.Tensor | None = None
        self._scaler: Any = None

    # ------------------------------------------------------------------ start and end

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()
        scaler = getattr(trainer.precision_plugin, "scaler", None)

        def stop(assessment: Assessment) -> None:
            trainer.should_stop = True

        watch = Watch(
            pl_module,
            every=self.every,
            log=self.log_path if trainer.is_global_zero else None,
            on_problem=self.on_problem,
            scaler=scaler,
            thresholds=self.thresholds,
            start=trainer.global_step,
            stop=stop,
            data_parallel=True,  # the callback runs on every rank of a DDP run
        )
        watch.__enter__()
        self.watch = watch
        self._scaler = scaler
        self._loss = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.close(failed=not isinstance(exception, GradientProblemError))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.close()

    def close(self, *, failed: bool = False) -> None:
        """Remove the hooks and close the history; safe to call more than once. ``failed``: closing because of
        an error on this rank (no collective with the other ranks)."""
        if self.watch is not None:
            self.watch.close(failed=failed)
        self._loss = None

    # ------------------------------------------------------------------ each step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.watch is not None:
            self.watch.arm_for(trainer.global_step)  # a later micro-batch of an armed step leaves it armed

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.watch is None:
            return
        value = loss.detach().float().sum()
        scale = scale_of(self._scaler)
        if scale is not None:
            value = (value / scale).reshape(())  # Lightning hands this hook the loss multiplied by the scale
        self._loss = value if self._loss is None else self._loss + value

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        watch = self.watch
        if watch is None:
            return
        loss, self._loss = self._loss, None
        try:
            result = watch.step(loss, step=trainer.global_step)
        except GradientProblemError as error:
            _log(trainer, error.assessment)
            raise
        if result is not None:
            _log(trainer, result)


def _log(trainer: Trainer, assessment: Assessment) -> None:
    metrics = scalars(assessment)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=assessment.step)
