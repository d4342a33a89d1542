"""Trained checkpoints are advised as trained (issue 18, item 5): never re-initialised.

Every model here is really trained (SGD steps on a task, seconds on CPU), then saved with and without the
optimizer state and checked under a threshold stricter than the default, so that its healthy gradient is
flagged and recommendations are made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gradcheck_cli
from cli_support import run_cli
from gradcheck_cli.advise.trained import REINITIALISING
from gradcheck_cli.diagnose.rules import Thresholds
from gradcheck_cli.settings import Provenance

TRAINED_FIT = {"gradient_clipping", "lower_lr", "batch_norm", "layer_norm", "residual", "lstm_gru"}
STRICT = 1.1
"""--exploding-above: the trained LSTM's input end carries about 1.27× the output's gradient (healthy by default)."""


class Sequence(nn.Module):
    """An LSTM over a sequence with a linear head on the last step (importable by --model)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 32, batch_first=True)
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, 4, generator=g)
    return x, x[:, :, 0].sum(1, keepdim=True) / 3  # the running sum of one input channel


def _trained() -> tuple[Sequence, torch.optim.Optimizer, float, float]:
    torch.manual_seed(0)
    model = Sequence()
    x, y = _task(64, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = last = 0.0
    for step in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        first, last = (float(loss.detach()), float(loss.detach())) if step == 0 else (first, float(loss.detach()))
    return model, opt, first, last


@pytest.fixture(scope="module")
def trained() -> tuple[Sequence, torch.optim.Optimizer]:
    model, opt, first, last = _trained()
    assert last < 0.1 * first  # it really learned the task
    return model, opt


def _ids(report: gradcheck_cli.Report) -> list[str]:
    return [rec.id for rec in report.recommendations]


def test_trained_lstm_is_not_reinitialised(trained: tuple[Sequence, torch.optim.Optimizer]) -> None:
    """Weights only, and with the checkpoint's optimizer state: clipping/lr/normalisation, never re-init."""
    model, _ = trained
    batch = _task(16, 1)
    for provenance in (None, Provenance(trained="the checkpoint holds optimizer state ('optimizer')")):
        report = gradcheck_cli.check(model, batch, provenance=provenance, thresholds=Thresholds(exploding=STRICT))
        assert not report.healthy
        ids = _ids(report)
        assert ids and not set(ids) & REINITIALISING, ids
        assert ids[0] in TRAINED_FIT
        assert all("keeps the weights, which are trained" in rec.why for rec in report.recommendations)
    assert "lstm.weight_hh_l0" in report.init_audit.trained_layers if report.init_audit else False


def test_fresh_lstm_still_gets_an_orthogonal_init() -> None:
    """The same model untrained, equally flagged: re-initialisation stays on the list (the rule is about training)."""
    torch.manual_seed(0)
    model = Sequence()
    with torch.no_grad():
        model.lstm.weight_hh_l0.mul_(6.0)  # a recurrent matrix far too large: exploding through time
    report = gradcheck_cli.check(model, _task(16, 1), thresholds=Thresholds(exploding=STRICT))
    assert "orthogonal_init" in _ids(report)


def test_partly_trained_model_names_its_trained_layers(trained: tuple[Sequence, torch.optim.Optimizer]) -> None:
    """Only the recurrent matrix looks trained (1 of 3 weights): the advice says which, and still keeps them all."""
    model, _ = trained
    report = gradcheck_cli.check(model, _task(16, 1), thresholds=Thresholds(exploding=STRICT))
    assert report.init_audit is not None and report.init_audit.skipped is None  # a minority: the audit ran
    first = report.recommendations[0].why
    assert "lstm.weight_hh_l0 (1 of 3 weights) no longer look like an initialisation" in first
    looks = {layer.layer: layer.looks_like for layer in report.init_audit.layers}
    assert looks["lstm.weight_hh_l0"] == "trained"  # never described as an initialisation scheme
    assert looks["head"] != "trained"
    # the text's audit line describes the initialisation of the untrained weights only
    line = next(line for line in str(report).splitlines() if line.startswith("init audit:"))
    assert "3 weights; of the 2 untrained, most look like" in line and "look like trained" not in line


@pytest.mark.parametrize("optimizer_state", [True, False])
def test_cli_trained_checkpoint(
    tmp_path: Path, trained: tuple[Sequence, torch.optim.Optimizer], optimizer_state: bool
) -> None:
    """The command line on the saved checkpoint, with and without the optimizer state."""
    model, opt = trained
    checkpoint = tmp_path / "lstm.pt"
    if optimizer_state:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 300}, checkpoint)
    else:
        torch.save(model.state_dict(), checkpoint)
    torch.save(_task(16, 1), tmp_path / "batch.pt")
    spec = f"{Path(__file__).resolve()}:Sequence"
    args = ["inspect", checkpoint, "--model", spec, "-i", tmp_path / "batch.pt", "-f", "json"]
    proc = run_cli([*args, "--exploding-above", str(STRICT)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    ids = [rec["id"] for rec in report["recommendations"]]
    assert ids and not set(ids) & REINITIALISING, ids
    assert ids[0] in TRAINED_FIT
    if optimizer_state:
        assert "optimizer state" in report["recommendations"][0]["why"]
