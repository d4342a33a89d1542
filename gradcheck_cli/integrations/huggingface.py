"""Watch the gradients of a Hugging Face ``Trainer`` run:
``Trainer(..., callbacks=[GradcheckTrainerCallback(every=50, log="grads.jsonl")])``.

Needs transformers (``pip install gradcheck[hf]``; the ``Trainer`` itself needs accelerate).

When things happen (transformers' ``Trainer``):

* ``on_step_begin`` comes before the forward of the first micro-batch of each optimiser step; the
  hooks of a recorded step are armed there and stay armed over all its micro-batches
  (``gradient_accumulation_steps``), so the record holds every one (``micro_batches`` in the history).
* ``on_pre_optimizer_step`` comes after the last backward, after the Trainer has unscaled (fp16) and
  clipped the gradients (``max_grad_norm``), before ``optimizer.step()``; the step is read there. The
  parameter gradients were measured as backward accumulated them, so the numbers are the unclipped
  ones, the same total norm as the ``grad_norm`` the Trainer logs, and those taken while a GradScaler's
  scale was applied are divided by it.
* Steps are numbered as the Trainer logs them: ``state.global_step + 1``, the value ``global_step``
  takes right after this optimiser step and the ``step`` of the ``loss``/``grad_norm`` it logs for it
  (1, 2, 3, ...; checkpoint-500 holds the weights after step 500). Step ``s`` is recorded when
  ``s % every == 0``, so with ``every == logging_steps`` each record falls on a step the Trainer logs.
* The loss: callbacks are not given it, so a forward hook on the model takes the ``loss`` the model
  returns (transformers models do when the batch has labels), per micro-batch, and the record gets the
  loss of the whole step, as the Trainer reports it: the sum over micro-batches when the model was
  given ``num_items_in_batch`` (its loss is then already normalised over the accumulated batch), else
  their mean. None when the model returns no loss (``compute_loss_func``, label smoothing, a
  ``compute_loss`` of your own): then under fp16 a GradScaler overflow cannot be told from a real
  NaN/Inf gradient.

After each record, ``gradcheck/total_norm``, ``gradcheck/gain``, ``gradcheck/attenuation`` (when the
record has them) and ``gradcheck/problems`` are logged where the run already reports: with
``"tensorboard"`` in ``report_to``, into the run ``gradcheck`` beside the Trainer's own TensorBoard
run(s) (``$TENSORBOARD_LOGGING_DIR/gradcheck``, else ``<output_dir>/runs/gradcheck``; with
transformers 4.x ``<logging_dir>/gradcheck``); with ``"wandb"`` and an active ``wandb.run``, with the
``train/global_step`` the Trainer's W&B callback plots against.

``on_problem``: ``warn`` (a :class:`~gradcheck_cli.training.monitor.GradientWarning`), ``raise``
(:class:`~gradcheck_cli.training.monitor.GradientProblemError` leaves ``trainer.train()``) or ``stop``
(``control.should_training_stop``: the optimiser step already begun completes, then ``train()``
returns) at the first record with NaN/Inf or exploding gradients.

Several processes: every process watches its own gradients and applies ``on_problem`` to them; only
the world process zero writes the history and logs the scalars.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError:  # pragma: no cover - the extra is not installed
    raise ImportError("gradcheck_cli.integrations.huggingface needs transformers: pip install gradcheck[hf]") from None

from gradcheck_cli.diagnose.rules import Thresholds
from gradcheck_cli.integrations import scalars
from gradcheck_cli.training.monitor import GradientProblemError, Watch, check_arguments
from gradcheck_cli.training.rules import Assessment

__all__ = ["GradcheckTrainerCallback"]


class GradcheckTrainerCallback(TrainerCallback):
    """Record every ``every``-th optimiser step of ``trainer.train()`` into the history file ``log``.

    ``log``: the JSON-lines history (``gradcheck history`` reads it); None keeps the records in memory
    only (``callback.watch.records``). ``on_problem``: ``warn``, ``raise`` or ``stop``.
    ``thresholds``: as for ``gradcheck_cli.watch``. The hooks are removed when training ends, when
    ``raise`` raises, or by :meth:`close` (the Trainer has no hook for other exceptions).
    """

    def __init__(
        self,
        every: int = 50,
        log: str | Path | None = None,
        on_problem: str = "warn",
        thresholds: Thresholds | None = None,
    ) -> None:
        check_arguments(every, on_problem)
        self.every = every
        self.log_path = None if log is None else Path(log)
        self.on_problem = on_problem
        self.thresholds = thresholds
        self.watch: Watch | None = None
        """The running monitor (kept after training ends: ``.records``, ``.onsets``, ``.should_stop``)."""
        self._losses: list[tuple[torch.Tensor, bool]] = []
        self._loss_hook: RemovableHandle | None = None
        self._stop_requested = False
        self._writer: Any = None
        self._reporting = False

    # ------------------------------------------------------------------ start and end

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradcheckTrainerCallback needs the Trainer's torch model, not {type(model).__name__}")
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)  # accelerate's AcceleratedOptimizer (fp16)
        self._reporting = state.is_world_process_zero
        watch = Watch(
            model,
            every=self.every,
            log=self.log_path if self._reporting else None,
            on_problem=self.on_problem,
            scaler=scaler,
            thresholds=self.thresholds,
            start=state.global_step + 1,
            stop=self._request_stop,
            data_parallel=True,  # the callback runs on every rank of a DDP run
        )
        watch.__enter__()
        self.watch = watch
        self._stop_requested = False
        self._losses = []
        self._loss_hook = model.register_forward_hook(self._take_loss, with_kwargs=True)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    def close(self, *, failed: bool = False) -> None:
        """Remove every hook, close the history and the TensorBoard writer; safe to call more than once.
        ``failed``: closing because of an error on this rank (no collective with the other ranks)."""
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.watch is not None:
            self.watch.close(failed=failed)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._losses = []

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down what close() needs
            self.close(failed=True)  # never a collective from the garbage collector

    # ------------------------------------------------------------------ each step

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.watch is not None:
            self._losses = []
            self.watch.arm_for(state.global_step + 1)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        watch = self.watch
        if watch is None:
            return
        step = state.global_step + 1
        loss = self._step_loss()
        try:
            result = watch.step(loss, step=step)
        except GradientProblemError as error:
            self._report(args, error.assessment)
            self.close()
            raise
        except BaseException:
            self.close(failed=True)
            raise
        if self._stop_requested:
            control.should_training_stop = True
        if result is not None:
            self._report(args, result)

    # ------------------------------------------------------------------ internals

    def _request_stop(self, assessment: Assessment) -> None:
        self._stop_requested = True

    def _take_loss(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        """Keep the ``loss`` the model returned for a training micro-batch (evaluation runs without grad)."""
        if not torch.is_grad_enabled() or not isinstance(output, Mapping):
            return
        loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel():
            self._losses.append((loss.detach().float().mean(), kwargs.get("num_items_in_batch") is not None))

    def _step_loss(self) -> torch.Tensor | None:
        losses, self._losses = self._losses, []
        if not losses:
            return None
        stacked = torch.stack([loss for loss, _ in losses])
        normalised = any(whole for _, whole in losses)
        return stacked.sum() if normalised else stacked.mean()

    def _report(self, args: TrainingArguments, assessment: Assessment) -> None:
        if not self._reporting:
            return
        metrics = scalars(assessment)
        report_to = list(getattr(args, "report_to", None) or [])
        if "tensorboard" in report_to:
            writer = self._tensorboard(args)
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(key, value, assessment.step)
                writer.flush()
        wandb = sys.modules.get("wandb")  # the Trainer's W&B callback imported it
        if "wandb" in report_to and wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.log({**metrics, "train/global_step": assessment.step})

    def _tensorboard(self, args: TrainingArguments) -> Any:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is not installed: the Trainer's own callback would have failed too
                return None
            base = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
            if not base:
                base = os.path.join(args.output_dir or ".", "runs")
            self._writer = SummaryWriter(log_dir=os.path.join(os.path.expanduser(base), "gradcheck"))
        return self._writer
