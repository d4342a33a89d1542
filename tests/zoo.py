"""Calibration models: healthy real architectures and known pathologies, each with a batch.

Run ``python tests/zoo.py`` to print the calibration table that docs/calibration.md holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcheck_cli.load.batch import Batch
from gradcheck_cli.load.examples import EXAMPLES, mlp


@dataclass(frozen=True)
class ZooModel:
    """A calibration model: its name, the verdict it must get, and how to build it with a batch."""

    name: str
    expected: str
    build: Callable[[], tuple[nn.Module, Batch]]


def _ids(vocab: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def hf_gpt2(labels: bool) -> tuple[nn.Module, Batch]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=64, vocab_size=1000)
    ids = _ids(config.vocab_size)
    kwargs = {"input_ids": ids, **({"labels": ids} if labels else {})}
    return GPT2LMHeadModel(config), Batch(kwargs=kwargs)


def hf_bert(labels: bool) -> tuple[nn.Module, Batch]:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=1000
    )
    ids = _ids(config.vocab_size)
    if labels:
        return BertForSequenceClassification(config), Batch(
            kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
        )
    return BertModel(config), Batch(kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def hf_vit() -> tuple[nn.Module, Batch]:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ViTForImageClassification(config), Batch(kwargs={"pixel_values": x, "labels": torch.tensor([1, 2])})


def hf_resnet() -> tuple[nn.Module, Batch]:
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="bottleneck", num_labels=10
    )
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return ResNetForImageClassification(config), Batch(kwargs={"pixel_values": x, "labels": torch.tensor([1, 2, 3, 4])})


def torch_transformer() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False)
    return model, Batch(args=(torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(1)),))


class LSTMClassifier(nn.Module):
    """A two-layer ``nn.LSTM`` over a sequence with a classifier on the last state."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def torch_lstm(steps: int = 100) -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return LSTMClassifier(), Batch(
        args=(torch.randn(8, steps, 16, generator=g),), target=torch.randint(0, 5, (8,), generator=g)
    )


def small_cnn() -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    g = torch.Generator().manual_seed(1)
    return model, Batch(args=(torch.randn(8, 3, 32, 32, generator=g),), target=torch.randint(0, 10, (8,), generator=g))


class FusedRNN(nn.Module):
    """A fused ``nn.RNN``/``nn.LSTM``/``nn.GRU`` over a whole sequence, classifier on the last step."""

    def __init__(self, kind: str, radius: float | None = None) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(8, 256, batch_first=True)
        if radius is not None:
            with torch.no_grad():
                w = torch.randn(256, 256)
                self.rnn.weight_hh_l0.copy_(w * radius / torch.linalg.eigvals(w).abs().max())
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def fused_rnn(kind: str, radius: float | None = None, steps: int = 200) -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, steps, 8, generator=g)
    return FusedRNN(kind, radius), Batch(args=(x,), target=torch.randint(0, 10, (16,), generator=g))


class UnrolledLSTM(nn.Module):
    """An ``nn.LSTMCell`` run step by step, classifier on the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(16, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[1], 64)
        for step in x:
            h, c = self.cell(step, (h, c))
        return self.head(h)


def unrolled_lstm(steps: int = 50) -> tuple[nn.Module, Batch]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 8, 16, generator=g)
    return UnrolledLSTM(), Batch(args=(x,), target=torch.randint(0, 5, (8,), generator=g))


def sigmoid_normal(width: int) -> tuple[nn.Module, Batch]:
    """50 sigmoid layers with N(0, 1) weights: narrow vanishes, wide explodes (σ_w² = width)."""
    torch.manual_seed(0)
    model = mlp(50, width, nn.Sigmoid, nn.init.normal_)
    g = torch.Generator().manual_seed(1)
    return model, Batch(args=(torch.randn(32, width, generator=g),), target=torch.randint(0, 10, (32,), generator=g))


def scaled_weight(fill: float | None, scale: float = 1.0) -> tuple[nn.Module, Batch]:
    """A 4-layer ReLU MLP whose middle layer's weights are filled with ``fill`` or scaled by ``scale``."""
    torch.manual_seed(0)
    model = mlp(4, 64, nn.ReLU, None)
    layer = model[2]
    assert isinstance(layer, nn.Linear)
    with torch.no_grad():
        if fill is not None:
            layer.weight.fill_(fill)
        layer.weight.mul_(scale)
    g = torch.Generator().manual_seed(1)
    return model, Batch(args=(torch.randn(16, 64, generator=g),), target=torch.randint(0, 10, (16,), generator=g))


def _example(name: str) -> Callable[[], tuple[nn.Module, Batch]]:
    return lambda: EXAMPLES[name].build(0)


HEALTHY = [
    ZooModel("hf-gpt2 (labels)", "healthy", lambda: hf_gpt2(True)),
    ZooModel("hf-gpt2 (no labels)", "healthy", lambda: hf_gpt2(False)),
    ZooModel("hf-bert-classifier", "healthy", lambda: hf_bert(True)),
    ZooModel("hf-bert-base (no labels)", "healthy", lambda: hf_bert(False)),
    ZooModel("hf-vit", "healthy", hf_vit),
    ZooModel("hf-resnet", "healthy", hf_resnet),
    ZooModel("nn.TransformerEncoder", "healthy", torch_transformer),
    ZooModel("nn.LSTM 20 steps", "healthy", lambda: torch_lstm(20)),
    ZooModel("nn.GRU 20 steps", "healthy", lambda: fused_rnn("GRU", steps=20)),
    ZooModel("nn.LSTMCell unrolled 20 steps", "healthy", lambda: unrolled_lstm(20)),
    ZooModel("cnn-inplace-relu", "healthy", small_cnn),
    ZooModel("relu-kaiming-50", "healthy", _example("relu-kaiming")),
    ZooModel("residual-mlp-50", "healthy", _example("residual")),
]

SICK = [
    ZooModel("sigmoid-default-50", "vanishing", _example("deep-sigmoid")),
    ZooModel("sigmoid-normal-50 (width 1)", "vanishing", lambda: sigmoid_normal(1)),
    ZooModel("sigmoid-normal-50 (width 256)", "exploding", lambda: sigmoid_normal(256)),
    ZooModel("relu-xavier-50", "vanishing", _example("relu-xavier")),
    ZooModel("linear-orthogonal-1.2x-50", "exploding", _example("deep-linear")),
    ZooModel("tanh-rnn-200 (radius 0.5)", "vanishing", _example("rnn-vanishing")),
    ZooModel("tanh-rnn-200 (radius 2.0)", "exploding", _example("rnn-exploding")),
    ZooModel("nn.RNN fused 200 (radius 0.5)", "vanishing", lambda: fused_rnn("RNN", 0.5)),
    ZooModel("nn.RNN fused 200 (radius 2.0)", "exploding", lambda: fused_rnn("RNN", 2.0)),
    # gated cells at default init over sequences long enough that the first steps' gradient is below 1e-10 of
    # the last's: they cannot learn a dependency on the first steps (docs/calibration.md, "Gated cells")
    ZooModel("nn.LSTM 100 steps", "vanishing", torch_lstm),
    ZooModel("nn.GRU 200 steps", "vanishing", lambda: fused_rnn("GRU")),
    ZooModel("nn.LSTMCell unrolled 50 steps", "vanishing", unrolled_lstm),
    ZooModel("nan-weight", "non_finite", _example("nan-weight")),
    ZooModel("huge-weight 1e38 (forward overflows)", "non_finite", lambda: scaled_weight(1e38)),
    ZooModel("weights ×1e30 (finite, norm overflows)", "exploding", lambda: scaled_weight(None, 1e30)),
]

ZOO = HEALTHY + SICK


Row = tuple[str, str, str, float | None, float | None, int, float | None]


def calibration_rows() -> list[Row]:
    """(model, expected, verdict, gain, attenuation, path length, through-time ratio) per zoo model."""
    from gradcheck_cli.api import check

    rows = []
    for entry in ZOO:
        model, batch = entry.build()
        report = check(model, batch)
        verdict = ",".join(p.value for p in report.problems) or "healthy"
        warnings = [f.code for f in report.findings if f.severity.value == "warning"]
        if warnings:
            verdict += f" (warning {', '.join(warnings)})"
        profile = next((layer.time_grad_norms for layer in report.layers if layer.time_grad_norms), ())
        through_time = profile[0] / profile[-1] if profile and profile[-1] else None
        path = report.path
        rows.append((entry.name, entry.expected, verdict, path.gain, path.attenuation, path.length, through_time))
    return rows


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


if __name__ == "__main__":
    print("| model | expected | verdict | gain per call | attenuation (input/output) | path length | through time |")
    print("|---|---|---|---|---|---|---|")
    for name, expected, verdict, gain, attenuation, length, through_time in calibration_rows():
        numbers = f"{_fmt(gain)} | {_fmt(attenuation)} | {length} | {_fmt(through_time)}"
        print(f"| {name} | {expected} | {verdict} | {numbers} |")
