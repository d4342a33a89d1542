"""RNN mode: backpropagation through time in a real recurrent cell, measured with the ``inspect`` probe.

A cell (``rnn``: ``nn.RNNCell`` with tanh; ``lstm``: ``nn.LSTMCell``; ``gru``: ``nn.GRUCell``;
``linear``: h_t = W_hh·h_{t−1} + W_ih·x_t + b, the identity-activation model of the theory) is run
in a Python loop over ``steps`` = T steps of random inputs (batch 8, 16 features, x ~ N(0, 1)), from
h_0 = 0. The loss sees the last hidden state h_T only: it is the probe's random projection
Σ⟨h_T, r⟩/√n (r ~ N(0, 1), seeded). The probe records ‖∂L/∂output‖ for every call of the cell, so one
pass gives ‖∂L/∂h_t‖ for t = 1…T; for the LSTM the cell's output is the pair (h_t, c_t), and the
probe's norm is that of the gradient with respect to the whole state, √(‖∂L/∂h_t‖² + ‖∂L/∂c_t‖²).

Recurrent weights. Every recurrent matrix is ρ·Q with Q a Haar-random orthogonal matrix (QR of a
Gaussian matrix, signs fixed): its spectral radius and every singular value are exactly ρ. For the
LSTM (gates i, f, g, o) and the GRU (r, z, n) each gate's hidden×hidden block of ``weight_hh`` gets
its own ρ·Q. Input weights and biases keep PyTorch's defaults. (``examples.UnrolledRNN`` scales a
Gaussian matrix to spectral radius ρ instead; its singular values spread up to about 2ρ.)

Per step distance k = T − t (k = 1…T−1, the gradient after k backward steps) the layer value is the
median over seeds of ‖∂L/∂h_t‖ / ‖∂L/∂h_T‖, with the min and max over seeds as low/high. ``ratio`` is
that value at the first step (k = T − 1), ``gain`` the geometric mean per step, ``verdict`` from
``verdict_of(ratio)``.

Theory. For the linear cell, ∂L/∂h_t = (Wᵀ)^(T−t)·∂L/∂h_T and W = ρQ, so the ratio is exactly
ρ^(T−1) and the gain ρ (the report's ``theory``, matched to rounding). For tanh, the Jacobian
diag(1 − h_t²)·W has norm at most ρ, so ρ^k is an upper bound that saturation pulls the measurement
below. LSTM and GRU gradients run mostly through the gates (the LSTM's cell state is scaled by the
forget gate each step, and with PyTorch's default forget-gate bias ≈ 0 that gate sits near ½), so ρ
alone does not fix them: no theory line there.

Numerics. The simulation runs in float64 (``dtype``): the probe's L2 norm sums squares, and in
float32 it underflows for gradient elements below ~1e-19 (√ of the smallest normal float32), long
before the gradient itself does at ~1e-45, and overflows above ~1.8e19. A norm is trusted only when
the gradient's largest element is at least √(smallest normal) of the dtype (~1.5e-154 in float64);
below that the value is reported as 0 (the gradient has underflowed the measurable range), and a norm
that overflows while the elements stay finite is reported as inf. The gain is then taken over the
stretch of steps whose value is finite and non-zero, as ``rules._gain`` does for ``inspect``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from gradcheck_cli.diagnose.gain import stretch_gain
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.probe.results import Norm
from gradcheck_cli.simulate.report import (
    EXPLODING_ABOVE,
    VANISHING_BELOW,
    Estimate,
    SimLayer,
    SimulationReport,
    depth_scale,
    verdict_of,
)

CELLS = ("rnn", "lstm", "gru", "linear")
GATES = {"rnn": 1, "lstm": 4, "gru": 3, "linear": 1}
BATCH = 8
INPUT_FEATURES = 16


class LinearCell(nn.Module):
    """h' = W_ih·x + W_hh·h + b: an RNN cell without activation, whose gradient theory is exact."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        bound = 1.0 / math.sqrt(hidden_size)
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_ih, self.bias) + nn.functional.linear(h, self.weight_hh)


class Unrolled(nn.Module):
    """The cell called once per time step in a Python loop; returns the last hidden state."""

    def __init__(self, cell: nn.Module, hidden: int, lstm: bool) -> None:
        super().__init__()
        self.cell = cell
        self.hidden = hidden
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], self.hidden)
        c = h
        for step in x:
            if self.lstm:
                h, c = self.cell(step, (h, c))
            else:
                h = self.cell(step, h)
        return h


def simulate_rnn(
    steps: int,
    radius: float,
    *,
    cell: str = "rnn",
    hidden: int = 128,
    seeds: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SimulationReport:
    """‖∂L/∂h_t‖ / ‖∂L/∂h_T‖ for every step of a cell with recurrent spectral radius ``radius``."""
    _validate(steps, radius, cell, hidden, seeds, seed, dtype)
    radius = float(radius)
    floor = math.sqrt(torch.finfo(dtype).tiny)
    runs = [_relative(_measure(steps, radius, cell, hidden, s, dtype), floor) for s in range(seed, seed + seeds)]
    distances = range(1, steps)  # k = T − t: t = T − 1 … 1
    per_k = [[run[steps - 1 - k] for run in runs] for k in distances]
    values = [_median(column) for column in per_k]
    linear_theory = cell in ("rnn", "linear")
    layers = tuple(
        SimLayer(
            index=k,
            value=value,
            theory=_power(radius, k) if linear_theory else None,
            monte_carlo=value,
            low=_spread(column, min),
            high=_spread(column, max),
        )
        for k, value, column in zip(distances, values, per_k, strict=True)
    )
    ratio = values[-1]
    gain = stretch_gain(values)
    seed_ratios = [run[0] for run in runs]
    seed_gains = [stretch_gain([run[steps - 1 - k] for k in distances]) for run in runs]
    monte_carlo = Estimate(
        gain=gain,
        ratio=ratio,
        depth_scale=depth_scale(gain),
        gain_low=_spread(seed_gains, min),
        gain_high=_spread(seed_gains, max),
        ratio_low=_spread(seed_ratios, min),
        ratio_high=_spread(seed_ratios, max),
        seeds=seeds,
    )
    theory = (
        Estimate(gain=radius, ratio=_power(radius, steps - 1), depth_scale=depth_scale(radius))
        if linear_theory
        else None
    )
    spec: dict[str, Any] = {
        "cell": cell,
        "steps": steps,
        "radius": radius,
        "hidden": hidden,
        "seeds": seeds,
        "seed": seed,
        "batch": BATCH,
        "input_features": INPUT_FEATURES,
        "dtype": str(dtype).removeprefix("torch."),
        "recurrent_init": f"orthogonal × {radius:g}"
        + (f", one per gate block ({GATES[cell]} blocks)" if GATES[cell] > 1 else ""),
    }
    return SimulationReport(
        mode="rnn",
        depth=steps,
        ratio=ratio,
        gain=gain,
        verdict=verdict_of(ratio),
        layers=layers,
        spec=spec,
        theory=theory,
        monte_carlo=monte_carlo,
        crossings={
            "vanishing": next((k for k, v in zip(distances, values, strict=True) if v < VANISHING_BELOW), None),
            "exploding": next(
                (k for k, v in zip(distances, values, strict=True) if v > EXPLODING_ABOVE or math.isnan(v)), None
            ),
        },
        notes=_notes(steps, radius, cell, values, gain, floor, dtype),
    )


def _validate(steps: int, radius: float, cell: str, hidden: int, seeds: int, seed: int, dtype: torch.dtype) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise GradcheckError(f"--steps must be a whole number of at least 2, got {steps}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise GradcheckError(f"--radius must be a positive number, got {radius}")
    if cell not in CELLS:
        raise GradcheckError(f"--cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise GradcheckError(f"--hidden must be a whole number of at least 1, got {hidden}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise GradcheckError(f"--seeds must be a whole number of at least 1, got {seeds}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31 - seeds:
        raise GradcheckError(f"--seed must be a whole number from 0 to {2**31 - 1 - seeds}, got {seed}")
    if dtype not in (torch.float32, torch.float64):
        raise GradcheckError(f"the simulation runs in float32 or float64, got {dtype}")


def build(
    cell: str, radius: float, hidden: int, steps: int, seed: int, dtype: torch.dtype
) -> tuple[Unrolled, torch.Tensor]:
    """The unrolled cell for one seed (every recurrent block radius·Haar-orthogonal) and its inputs.

    Default initialisation, recurrent blocks and inputs come, in that order, from one torch stream
    seeded 2·seed + 1; the probe's projection uses seed 2·seed, so no two of them share random bits.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2 * seed + 1)
        module: nn.Module
        if cell == "rnn":
            module = nn.RNNCell(INPUT_FEATURES, hidden, nonlinearity="tanh")
        elif cell == "lstm":
            module = nn.LSTMCell(INPUT_FEATURES, hidden)
        elif cell == "gru":
            module = nn.GRUCell(INPUT_FEATURES, hidden)
        else:
            module = LinearCell(INPUT_FEATURES, hidden)
        module = module.to(dtype)  # before the recurrent blocks, so that they are orthogonal in ``dtype``
        weight = module.weight_hh
        assert isinstance(weight, torch.Tensor)
        with torch.no_grad():
            for block in range(GATES[cell]):
                weight[block * hidden : (block + 1) * hidden] = radius * orthogonal(hidden)
        x = torch.randn(steps, BATCH, INPUT_FEATURES, dtype=torch.float64).to(dtype)
    return Unrolled(module, hidden, lstm=cell == "lstm"), x


def orthogonal(n: int) -> torch.Tensor:
    """A Haar-random n×n orthogonal matrix (float64) from torch's global stream."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # column signs fixed: Haar, not QR-biased


def _measure(steps: int, radius: float, cell: str, hidden: int, seed: int, dtype: torch.dtype) -> list[Norm | None]:
    """The probe's ‖∂L/∂h_t‖ for t = 1…T (None where no gradient reached the step)."""
    model, x = build(cell, radius, hidden, steps, seed, dtype)
    result = probe(model, Batch(args=(x,)), seed=2 * seed)
    calls = result.layers[0].calls
    assert len(calls) == steps
    return list(calls)


def _relative(calls: list[Norm | None], floor: float) -> list[float]:
    """Each step's norm ÷ the last step's, after the range checks of the module docstring."""
    norms = [_trusted(norm, floor) for norm in calls]
    last = norms[-1]
    if not (math.isfinite(last) and last > 0):
        raise GradcheckError(f"the gradient at the last step is {last}; the simulation cannot be normalised")
    return [value / last for value in norms]


def _trusted(norm: Norm | None, floor: float) -> float:
    if norm is None:
        return 0.0
    top = norm.l2 if norm.max_abs is None else norm.max_abs  # output gradients: their max is always measured
    if top == 0:
        return 0.0
    if math.isnan(top) or math.isnan(norm.l2):
        return math.nan
    if math.isinf(top) or math.isinf(norm.l2):
        return math.inf
    if top < floor:
        return 0.0  # the sum of squares underflowed: the L2 norm is not reliable here
    return norm.l2


def _median(column: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in column) else float(statistics.median(column))


def _spread(column: list[float], pick: Any) -> float:
    return math.nan if any(math.isnan(v) for v in column) else float(pick(column))


def _power(base: float, exponent: int) -> float:
    """base**exponent without OverflowError: inf above the float range, 0 below it."""
    try:
        return float(base**exponent)  # exact powers stay exact (0.5**3 == 0.125); underflow gives 0.0
    except OverflowError:
        return math.inf


def _notes(
    steps: int, radius: float, cell: str, values: list[float], gain: float, floor: float, dtype: torch.dtype
) -> tuple[str, ...]:
    linear = _power(radius, steps - 1)
    notes = [
        f"ratio = ‖∂L/∂h_1‖ / ‖∂L/∂h_{steps}‖: {steps - 1} backward steps through the cell; the loss "
        "sees the last hidden state only; median over seeds (low/high: min/max)",
    ]
    if cell == "linear":
        notes.append(f"theory: the linear RNN with W = ρ·orthogonal gives exactly ρ^(T−1) = {linear:.4g}")
    elif cell == "rnn":
        notes.append(
            f"theory: a linear RNN with W = ρ·orthogonal gives exactly ρ^(T−1) = {linear:.4g}; tanh multiplies "
            "each step by tanh' ≤ 1, so that is an upper bound and saturation shrinks the measured value"
        )
    else:
        notes.append(
            f"no closed form for the {cell.upper()}: a linear RNN with the same ρ would give ρ^(T−1) = "
            f"{linear:.4g}, but the gates (σ' ≤ ¼, tanh' ≤ 1, the {'forget' if cell == 'lstm' else 'update'} "
            "gate's per-step factor in (0, 1)) shrink and reshape the product"
        )
    if cell == "lstm":
        notes.append(
            "LSTM: the norm is of the gradient with respect to the whole state (h_t, c_t); PyTorch's default "
            "forget-gate bias (≈ 0, so f ≈ ½) lets the cell state forget, whatever ρ is"
        )
    zeros = sum(1 for v in values if v == 0)
    if zeros:
        notes.append(
            f"{zeros} of {len(values)} steps read 0: the gradient fell below ~{floor:.2g} (√ of the smallest "
            f"normal {str(dtype).removeprefix('torch.')}), where its L2 norm underflows; the gain "
            f"{gain:.4g} is the geometric mean over the non-zero stretch"
        )
    overflows = sum(1 for v in values if math.isinf(v) or math.isnan(v))
    if overflows:
        notes.append(
            f"{overflows} of {len(values)} steps overflowed the {str(dtype).removeprefix('torch.')} range (inf); "
            f"the gain {gain:.4g} is the geometric mean over the finite stretch"
        )
    return tuple(notes)
