"""What the watch() tests share: a small tanh MLP, its regression data, a plain training loop, and hook counts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradcheck_cli import watch
from gradcheck_cli.training.log import StepLog
from gradcheck_cli.training.monitor import Watch


def tanh_mlp(depth: int = 4, width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def regression_data(seed: int = 0, n: int = 128, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    return x, x[:, :1].sin() + 0.5 * x[:, 1:2]


def train(
    model: nn.Module,
    w: Watch,
    steps: int,
    *,
    lr: float = 0.1,
    blow_up_at: int | None = None,
    factor: float = 300.0,
) -> list[float]:
    """A plain SGD loop with w.step(loss) between backward and the optimiser step; returns the losses."""
    x, y = regression_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        if step == blow_up_at:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        w.step(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def hook_count(model: nn.Module) -> int:
    modules = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return modules + params


def single_record(model: nn.Module, run: Callable[[Watch], None], **kwargs: object) -> StepLog:
    """The record of the one step ``run`` makes under ``watch(model, every=1, **kwargs)``."""
    captured: list[StepLog] = []
    with watch(model, every=1, **kwargs) as w:  # type: ignore[arg-type]
        real = w._judge

        def keep(log: StepLog):  # type: ignore[no-untyped-def]
            captured.append(log)
            return real(log)

        w._judge = keep  # type: ignore[method-assign]
        run(w)
    return captured[0]
