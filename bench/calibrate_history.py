"""Calibrate the rules over training time (history_rules.SPIKE) on real healthy training runs.

Every step is recorded (every=1). For each run it prints the largest ratio of a record's total gradient
norm to the median of the healthy records before it, which records any rule flagged, and for the
diverging runs the onset step. Usage: python bench/calibrate_history.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.training.history import history_report
from gradcheck_cli.training.monitor import watch
from gradcheck_cli.training.rules import MIN_REFERENCE, PERSIST, WINDOW


def _gpt2(layers: int = 4, width: int = 128) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=width, n_head=4, vocab_size=256, n_positions=64)
    return GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=256, vocab_size=256,
        max_position_embeddings=64,
    )  # fmt: skip
    return BertForMaskedLM(config)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 3
        for out in (16, 32, 64):
            blocks += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.lstm = nn.LSTM(32, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 50)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


def _task(name: str) -> tuple[nn.Module, Callable[[int], torch.Tensor], str]:
    """(model, loss of step i, optimiser family)."""
    g = torch.Generator().manual_seed(1)
    if name in ("gpt2", "bert"):
        model = _gpt2() if name == "gpt2" else _bert()
        # a learnable language: each sequence repeats a random 8-token motif
        motifs = torch.randint(0, 256, (64, 8), generator=g)

        def loss_gpt(i: int) -> torch.Tensor:
            idx = torch.randint(0, 64, (8,), generator=g)
            ids = motifs[idx].repeat(1, 4)
            return model(input_ids=ids, labels=ids).loss

        return model, loss_gpt, "adamw"
    if name.startswith("mlp"):
        depth = 8
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(64, 64), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(64, 10))
        if name == "mlp-small-batch":  # plain SGD needs Kaiming init to learn at all (default init vanishes)
            for m in model:
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        centres = torch.randn(10, 64, generator=g) * 2
        batch = 8 if name == "mlp-small-batch" else 128

        def loss_mlp(i: int) -> torch.Tensor:
            y = torch.randint(0, 10, (batch,), generator=g)
            x = centres[y] + torch.randn(batch, 64, generator=g)
            return nn.functional.cross_entropy(model(x), y)

        return model, loss_mlp, "sgd" if name == "mlp-small-batch" else "adam"
    if name == "cnn":
        model = CNN()
        templates = torch.randn(10, 3, 32, 32, generator=g)

        def loss_cnn(i: int) -> torch.Tensor:
            y = torch.randint(0, 10, (32,), generator=g)
            x = templates[y] + 0.5 * torch.randn(32, 3, 32, 32, generator=g)
            return nn.functional.cross_entropy(model(x), y)

        return model, loss_cnn, "sgd-momentum"
    if name == "lstm":
        model = LSTMTagger()

        def loss_lstm(i: int) -> torch.Tensor:
            x = torch.randint(0, 50, (16, 30), generator=g)
            target = torch.roll(x, 1, dims=1)  # predict the previous token
            return nn.functional.cross_entropy(model(x).reshape(-1, 50), target.reshape(-1))

        return model, loss_lstm, "adam"
    raise ValueError(name)


LR = {"adamw": 3e-4, "adam": 1e-3, "sgd": 0.05, "sgd-momentum": 0.05}


def _optimizer(model: nn.Module, family: str, lr: float) -> torch.optim.Optimizer:
    if family == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if family == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    momentum = 0.9 if family == "sgd-momentum" else 0.0
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def run(name: str, steps: int, blow_up_at: int | None, factor: float, directory: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model, loss_of, family = _task(name)
    lr = LR[family]
    optimizer = _optimizer(model, family, lr)
    log = directory / f"{name}-{blow_up_at}.jsonl"
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch(model, every=1, log=log) as w:
            for i in range(steps):
                if blow_up_at is not None and i == blow_up_at:
                    for group in optimizer.param_groups:
                        group["lr"] = lr * factor
                loss = loss_of(i)
                loss.backward()
                w.step(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    report = history_report(log)
    assert report.history is not None
    norms = [r.grad_norm for r in report.history.steps]
    ratios = []
    healthy: list[float] = []
    for record, (step, _) in zip(report.history.steps, [(s.step, None) for s in report.history.steps], strict=True):
        if len(healthy) >= MIN_REFERENCE and math.isfinite(record.grad_norm):
            ratios.append((record.grad_norm / statistics.median(healthy[-WINDOW:]), step))
        if not any(step == s for s, _ in report.history.problem_steps) and math.isfinite(record.grad_norm):
            healthy.append(record.grad_norm)
    top = max(ratios, default=(math.nan, -1))
    # the loss rule's statistic: the smallest loss ÷ healthy median over PERSIST records in a row, at its largest
    flagged = {s for s, _ in report.history.problem_steps}
    loss_ratios: list[float] = []
    healthy_losses: list[float] = []
    for record in report.history.steps:
        recent = healthy_losses[-WINDOW:]
        if len(recent) >= MIN_REFERENCE and math.isfinite(record.loss):
            loss_ratios.append(record.loss / statistics.median(recent))
        if record.step not in flagged and math.isfinite(record.loss):
            healthy_losses.append(record.loss)
    runs = [min(loss_ratios[i : i + PERSIST]) for i in range(len(loss_ratios) - PERSIST + 1)]
    losses = [r.loss for r in report.history.steps]
    return {
        "run": name,
        "steps": steps,
        "lr": lr,
        "blow_up_at": blow_up_at,
        "factor": factor if blow_up_at is not None else None,
        "verdict": report.history.verdict,
        "onsets": [(o.problem, o.step, o.last_healthy_step, list(o.codes)) for o in report.history.onsets],
        "flagged_steps": len(report.history.problem_steps),
        "max_ratio_to_median": top[0],
        "max_ratio_step": top[1],
        "max_sustained_loss_ratio": max(runs, default=math.nan),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "norm_first": norms[0],
        "norm_last": norms[-1],
        "gain_first": report.history.gain_first,
        "gain_last": report.history.gain_last,
        "seconds": time.perf_counter() - started,
    }


def margins(log: Path) -> dict[str, Any]:
    """Replay a log through the rules and report how close each rule over time came to firing.

    ``spike_margin``: the largest total norm ÷ the GC016 threshold max(SPIKE × median, PEAK × peak) over the
    records before the first spike or NaN; ``loss_margin``: over every PERSIST records in a row, the smallest
    loss ÷ (LOSS_RISE × median), counting 0 for a record that had not regained REGAINED of the progress.
    Both below 1 mean the rule stayed silent with that much room.
    """
    from gradcheck_cli.training import rules
    from gradcheck_cli.training.log import read_history

    history = read_history(log)
    baseline = rules.Baseline()
    spike = loss_margin = 0.0
    window: list[float] = []
    for record in history.records:
        assessment = rules.assess(record, baseline, scaler=history.header.scaler)
        if assessment.problems and any(p.value != "vanishing" for p in assessment.problems):
            break
        reference, peak = baseline.reference_norm(), max(baseline.norms, default=0.0)
        if reference and math.isfinite(assessment.total_norm):
            spike = max(spike, assessment.total_norm / max(rules.SPIKE * reference, rules.PEAK * peak))
        median = baseline.reference_loss()
        ratio = 0.0
        if median and record.loss is not None and math.isfinite(record.loss):
            first = baseline.losses[0]
            regained = first <= median or record.loss - median >= rules.REGAINED * (first - median)
            ratio = record.loss / (rules.LOSS_RISE * median) if regained else 0.0
        window = [*window, ratio][-rules.PERSIST :]
        if len(window) == rules.PERSIST:
            loss_margin = max(loss_margin, min(window))
        rules.advance(baseline, record, assessment)
    report = history_report(log)
    assert report.history is not None
    steps = report.history.steps
    return {
        "log": log.stem,
        "verdict": report.history.verdict,
        "onsets": [(o.problem, o.step, o.last_healthy_step, list(o.codes)) for o in report.history.onsets],
        "first_loss": steps[0].loss if steps else None,
        "last_loss": steps[-1].loss if steps else None,
        "spike_margin": spike,
        "loss_margin": loss_margin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs", default="gpt2,bert,mlp,mlp-small-batch,cnn,lstm")
    parser.add_argument("--keep", type=Path, help="keep the history logs in this directory")
    parser.add_argument("--replay", type=Path, help="only replay the logs kept in this directory (no training)")
    args = parser.parse_args()
    if args.replay:
        replayed = [margins(log) for log in sorted(args.replay.glob("*.jsonl"))]
        for entry in replayed:
            print(json.dumps(entry))
        if args.json:
            args.json.write_text(json.dumps(replayed, indent=1) + "\n")
        return
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for name in args.runs.split(","):
            for blow_up in (None, args.steps // 2):
                factor = 300.0
                log = directory / f"{name}-{blow_up}.jsonl"
                log.unlink(missing_ok=True)
                result = run(name, args.steps, blow_up, factor, directory)
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
