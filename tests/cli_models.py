"""Tiny models, factories and a malicious pickle payload for the end-to-end CLI tests.

Pickled checkpoints written by ``test_cli_checkpoints.py`` refer to these classes as
``cli_models.<Name>``, so the CLI subprocess needs this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

IN_FEATURES = 8
WIDTH = 16
OUT_FEATURES = 4


class TinyNet(nn.Module):
    """Two Linear layers with a ReLU between them: healthy by construction."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, width)
        self.fc2 = nn.Linear(width, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class KeywordNet(nn.Module):
    """A model whose ``forward`` needs a keyword-only ``mask``: it must be called with keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, WIDTH)
        self.fc2 = nn.Linear(WIDTH, OUT_FEATURES)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x * mask)))


def make_tiny() -> TinyNet:
    """The ``--model cli_models:make_tiny`` factory (seeded, but the checkpoint's weights replace these)."""
    torch.manual_seed(0)
    return TinyNet()


def make_keyword() -> KeywordNet:
    """The ``--model cli_models:make_keyword`` factory."""
    torch.manual_seed(0)
    return KeywordNet()


class MaliciousPayload:
    """Unpickling this runs a shell command (``os.system``): what ``--trust`` must guard against."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def make_fuzz_target() -> nn.Module:
    """The architecture of tests/test_fuzz_loader.py's checkpoint: Linear 8→8, ReLU, Linear 8→2."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


class Nested(nn.Module):
    """A block inside a block, whose inner layer raises for a batch of the wrong width."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(WIDTH + 1, OUT_FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class ArgmaxNet(nn.Module):
    """Returns class indices: an integer output that carries no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(dim=-1)


class DetachedNet(nn.Module):
    """Returns a detached output: no gradient reaches any parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach()


class TokenNet(nn.Module):
    """An embedding and a classifier: takes int64 token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, WIDTH)
        self.head = nn.Linear(WIDTH, OUT_FEATURES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


class BufferOnly(nn.Module):
    """No parameters at all, only a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(IN_FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_not_a_module() -> int:
    """A factory that returns something other than an nn.Module."""
    return 42


def make_exiting() -> nn.Module:
    """A factory that calls sys.exit(0), as an argparse-driven script would: must not pass the gate."""
    raise SystemExit(0)


class SparseBag(nn.Module):
    """A sparse embedding (its gradient is a sparse tensor) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, WIDTH, sparse=True)
        self.head = nn.Linear(WIDTH, OUT_FEATURES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))
