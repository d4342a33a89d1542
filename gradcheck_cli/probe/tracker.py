"""Which module was running when a forward pass raised."""

from __future__ import annotations

import contextlib
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradcheck_cli.load.batch import Batch


class ModuleTracker:
    """Keeps the stack of modules whose forward has started but not finished, inside a ``with`` block.

    When the forward raises, the top of the stack is the innermost module that was running.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._stack = contextlib.ExitStack()
        self.running: list[str] = []

    def __enter__(self) -> ModuleTracker:
        try:
            for name, module in self._model.named_modules():
                self._stack.enter_context(module.register_forward_pre_hook(self._enter(name)))
                self._stack.enter_context(module.register_forward_hook(self._leave(name)))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _enter(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.running.append(name)

        return hook

    def _leave(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.running and self.running[-1] == name:
                self.running.pop()

        return hook


def where_forward_raises(model: nn.Module, batch: Batch, seed: int) -> str | None:
    """Replay the failing forward (without gradients) and name the innermost module that raised.

    Only called after a failure, so a successful probe pays nothing for it. None when the
    model cannot take module hooks (TorchScript) or the replay does not raise again.
    """
    if isinstance(model, torch.jit.ScriptModule):
        return None
    with ModuleTracker(model) as tracker, torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model(*batch.args, **batch.kwargs)
        except Exception:
            innermost = tracker.running[-1] if tracker.running else None
            if innermost is None:
                return None
            module = model.get_submodule(innermost)
            return f"{innermost or '(the model itself)'} ({type(module).__name__})"
    return None
