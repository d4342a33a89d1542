"""Built-in example models, each with a batch: the known pathologies and their healthy fixes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.batch import Batch

DEPTH = 50


@dataclass(frozen=True)
class Example:
    """A named model with a batch, and the verdict gradcheck should reach on it."""

    name: str
    summary: str
    expected: str
    """``healthy`` or the problem it shows (``vanishing``, ``exploding``, ``non_finite``)."""
    build: Callable[[int], tuple[nn.Module, Batch]]


def mlp(
    depth: int,
    width: int,
    activation: Callable[[], nn.Module] | None,
    init: Callable[[torch.Tensor], object] | None,
    *,
    in_features: int | None = None,
    out_features: int = 10,
) -> nn.Sequential:
    """``depth`` Linear layers (the last maps to ``out_features``), each but the last followed by ``activation``."""
    layers: list[nn.Module] = []
    sizes = [in_features or width] + [width] * (depth - 1) + [out_features]
    for i in range(depth):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        if init is not None:
            init(linear.weight)
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if activation is not None and i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """``x + W2·relu(W1·LayerNorm(x))``: a pre-norm residual MLP block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """An input projection, ``depth`` residual blocks and a classifier head."""

    def __init__(self, depth: int, width: int, out_features: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class UnrolledRNN(nn.Module):
    """A tanh ``nn.RNNCell`` run step by step over the sequence; the loss sees the last state only."""

    def __init__(self, in_features: int, hidden: int, radius: float, out_features: int = 10) -> None:
        super().__init__()
        self.cell = nn.RNNCell(in_features, hidden, nonlinearity="tanh")
        with torch.no_grad():
            w = torch.randn(hidden, hidden)
            w *= radius / torch.linalg.eigvals(w).abs().max()
            self.cell.weight_hh.copy_(w)
        self.readout = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        for step in x:
            h = self.cell(step, h)
        return self.readout(h)


def _classification(model: nn.Module, in_features: int, seed: int, batch: int = 64) -> tuple[nn.Module, Batch]:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_features, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, Batch(args=(x,), target=y)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def build_deep_sigmoid(seed: int) -> tuple[nn.Module, Batch]:
    """50 Linear+Sigmoid layers of width 16 with PyTorch's default init."""
    _seeded(seed)
    return _classification(mlp(DEPTH, 16, nn.Sigmoid, None), 16, seed)


def build_relu_xavier(seed: int) -> tuple[nn.Module, Batch]:
    """50 Linear+ReLU layers of width 256, Xavier-normal weights: the gain is 1/√2 per layer."""
    _seeded(seed)
    return _classification(mlp(DEPTH, 256, nn.ReLU, nn.init.xavier_normal_), 256, seed)


def build_relu_kaiming(seed: int) -> tuple[nn.Module, Batch]:
    """The same net with Kaiming-normal weights: the gain is 1 per layer."""
    _seeded(seed)
    init = lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")  # noqa: E731
    return _classification(mlp(DEPTH, 256, nn.ReLU, init), 256, seed)


def build_deep_linear(seed: int) -> tuple[nn.Module, Batch]:
    """50 linear layers of width 128 with orthogonal weights scaled 1.2×: the gradient grows 1.2× per layer."""
    _seeded(seed)
    init = lambda w: nn.init.orthogonal_(w, gain=1.2)  # noqa: E731
    return _classification(mlp(DEPTH, 128, None, init), 128, seed)


def build_residual(seed: int) -> tuple[nn.Module, Batch]:
    """50 pre-norm residual MLP blocks of width 128: shortcuts keep the gradient."""
    _seeded(seed)
    return _classification(ResidualMLP(DEPTH, 128), 128, seed)


def _rnn(radius: float, seed: int) -> tuple[nn.Module, Batch]:
    _seeded(seed)
    model = UnrolledRNN(8, 256, radius)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(200, 16, 8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return model, Batch(args=(x,), target=y)


def build_rnn_vanishing(seed: int) -> tuple[nn.Module, Batch]:
    """A tanh RNN cell unrolled over 200 steps, recurrent spectral radius 0.5."""
    return _rnn(0.5, seed)


def build_rnn_exploding(seed: int) -> tuple[nn.Module, Batch]:
    """A tanh RNN cell unrolled over 200 steps, recurrent spectral radius 2.0."""
    return _rnn(2.0, seed)


def build_nan_weight(seed: int) -> tuple[nn.Module, Batch]:
    """A small ReLU MLP one of whose weights is NaN, as after a diverged optimiser step."""
    _seeded(seed)
    model = mlp(4, 64, nn.ReLU, None)
    broken = model[2]
    assert isinstance(broken, nn.Linear)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    return _classification(model, 64, seed)


def build_dead_relu(seed: int) -> tuple[nn.Module, Batch]:
    """An 8-layer Kaiming ReLU MLP whose fourth layer has bias −10: its units never fire."""
    _seeded(seed)
    init = lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")  # noqa: E731
    model = mlp(8, 128, nn.ReLU, init)
    dead = model[6]
    assert isinstance(dead, nn.Linear)
    with torch.no_grad():
        dead.bias.fill_(-10.0)
    return _classification(model, 128, seed)


def build_saturated_sigmoid(seed: int) -> tuple[nn.Module, Batch]:
    """A 50-layer sigmoid MLP of width 256 with N(0, 1) weights: pre-activations far in the flat tails."""
    _seeded(seed)
    return _classification(mlp(DEPTH, 256, nn.Sigmoid, nn.init.normal_), 256, seed)


class Scaled(nn.Module):
    """Multiplies by a constant: a temperature, or a loss weight folded into the model."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def build_fp16_underflow(seed: int) -> tuple[nn.Module, Batch]:
    """A healthy 6-layer Kaiming ReLU MLP held in fp16 whose logits are scaled by 1e-5: tiny gradients."""
    _seeded(seed)
    init = lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")  # noqa: E731
    model = nn.Sequential(mlp(6, 128, nn.ReLU, init), Scaled(1e-5)).half()
    built, batch = _classification(model, 128, seed)
    return built, Batch(args=tuple(a.half() for a in batch.args), target=batch.target)


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example(
            "deep-sigmoid",
            "50-layer sigmoid MLP, default init (the classic vanishing chain)",
            "vanishing",
            build_deep_sigmoid,
        ),
        Example(
            "relu-xavier", "50-layer ReLU MLP with Xavier init (gain ≈ 0.71 per layer)", "vanishing", build_relu_xavier
        ),
        Example("relu-kaiming", "the same ReLU MLP with Kaiming init (the fix)", "healthy", build_relu_kaiming),
        Example("deep-linear", "50-layer linear net, orthogonal weights ×1.2", "exploding", build_deep_linear),
        Example("residual", "50-block pre-norm residual MLP", "healthy", build_residual),
        Example("rnn-vanishing", "tanh RNN cell over 200 steps, spectral radius 0.5", "vanishing", build_rnn_vanishing),
        Example("rnn-exploding", "tanh RNN cell over 200 steps, spectral radius 2.0", "exploding", build_rnn_exploding),
        Example("nan-weight", "ReLU MLP with one NaN weight", "non_finite", build_nan_weight),
        Example("dead-relu", "ReLU MLP whose 4th layer has bias −10 (dead units)", "vanishing", build_dead_relu),
        Example(
            "saturated-sigmoid",
            "50-layer sigmoid MLP with N(0, 1) weights (saturated units)",
            "exploding",
            build_saturated_sigmoid,
        ),
        Example(
            "fp16-underflow",
            "fp16 ReLU MLP with logits scaled by 1e-5 (gradients below fp16's range)",
            "healthy",
            build_fp16_underflow,
        ),
    )
}


def get_example(name: str) -> Example:
    """The example called ``name``, or an error listing the names there are."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise GradcheckError(f"unknown example {name!r}; choose one of: {', '.join(EXAMPLES)}") from None
