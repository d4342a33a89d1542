"""Network mode: mean-field theory beside Monte Carlo on real random torch networks of the same spec."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gradcheck_cli.diagnose.gain import stretch_gain
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.load.batch import Batch
from gradcheck_cli.probe.measure import probe
from gradcheck_cli.simulate.meanfield import ACTIVATIONS, mean_field
from gradcheck_cli.simulate.report import Estimate, SimLayer, SimulationReport, depth_scale, verdict_of

INITS = ("normal", "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal")
NORMS = ("batch", "layer")
BATCH = 64
MAX_WIDTH = 16_384
MAX_DEPTH = 10_000
MAX_SEEDS = 1_000
MAX_SCALE = 1e6
"""Bounds that keep σ_w² finite and a simulation within memory; beyond them the question is moot."""
KAIMING_GAIN = {"linear": 1.0, "relu": math.sqrt(2.0), "leaky_relu": math.sqrt(2.0 / (1 + 0.01**2)),
                "tanh": 5.0 / 3.0, "sigmoid": 1.0, "gelu": math.sqrt(2.0), "silu": math.sqrt(2.0),
                "elu": math.sqrt(2.0)}  # fmt: skip
"""``nn.init.calculate_gain`` for Kaiming init; it has no entry for gelu/silu/elu, for which ReLU's √2 is used."""


@dataclass(frozen=True)
class NetworkSpec:
    """A random network: ``depth`` square layers of ``width`` units, an activation and an initialisation."""

    depth: int
    activation: str
    init: str
    width: int = 256
    weight_scale: float = 1.0
    bias_std: float | None = None
    """None: zero biases (PyTorch's own for ``default``)."""
    residual: bool = False
    norm: str | None = None
    seeds: int = 3
    seed: int = 0

    def validate(self) -> None:
        """One-line errors for impossible specs."""
        if self.depth < 1:
            raise GradcheckError(f"--depth must be at least 1, got {self.depth}")
        if self.activation not in ACTIVATIONS:
            raise GradcheckError(f"--activation {self.activation!r} is not one of: {', '.join(ACTIVATIONS)}")
        if self.init not in INITS:
            raise GradcheckError(f"--init {self.init!r} is not one of: {', '.join(INITS)}")
        if self.norm is not None and self.norm not in NORMS:
            raise GradcheckError(f"--norm {self.norm!r} is not one of: {', '.join(NORMS)}")
        if not (1 <= self.width <= MAX_WIDTH and 1 <= self.seeds <= MAX_SEEDS and self.depth <= MAX_DEPTH):
            raise GradcheckError(
                f"--width must be 1…{MAX_WIDTH}, --seeds 1…{MAX_SEEDS} and --depth at most {MAX_DEPTH} "
                f"(got {self.width}, {self.seeds}, {self.depth})"
            )
        if not 0 < self.weight_scale <= MAX_SCALE:
            raise GradcheckError(f"--weight-scale must be in (0, {MAX_SCALE:g}], got {self.weight_scale}")
        if self.bias_std is not None and not 0 <= self.bias_std <= MAX_SCALE:
            raise GradcheckError(f"--bias-std must be in [0, {MAX_SCALE:g}], got {self.bias_std}")

    @property
    def plain(self) -> bool:
        """Whether the plain mean-field map applies (no shortcut, no normalisation)."""
        return not self.residual and self.norm is None

    def sigma_w2(self) -> float:
        """σ_w² = fan_in·Var(W) for square layers, including ``weight_scale``."""
        base = {
            "normal": float(self.width),
            "default": 1.0 / 3.0,
            "xavier_uniform": 1.0,
            "xavier_normal": 1.0,
            "kaiming_uniform": KAIMING_GAIN[self.activation] ** 2,
            "kaiming_normal": KAIMING_GAIN[self.activation] ** 2,
            "orthogonal": 1.0,
        }[self.init]
        return base * self.weight_scale**2

    def sigma_b2(self) -> float:
        """Var(b): ``bias_std``², or PyTorch's default U(±1/√fan_in) for ``default`` init, else 0."""
        if self.bias_std is not None:
            return self.bias_std**2
        return 1.0 / (3.0 * self.width) if self.init == "default" else 0.0


class Block(nn.Module):
    """One layer of the simulated network: [norm] → Linear → activation, with an optional shortcut."""

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.norm: nn.Module | None = None
        if spec.norm == "batch":
            self.norm = nn.BatchNorm1d(spec.width)
        elif spec.norm == "layer":
            self.norm = nn.LayerNorm(spec.width)
        self.linear = nn.Linear(spec.width, spec.width)
        self.act = activation_module(spec.activation)
        self.residual = spec.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x) if self.norm is not None else x
        out = self.act(self.linear(h))
        return x + out if self.residual else out


def activation_module(name: str) -> nn.Module:
    """The torch module for an activation name (leaky slope 0.01, ELU α = 1)."""
    modules: dict[str, type[nn.Module]] = {
        "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU, "linear": nn.Identity,
    }  # fmt: skip
    return modules[name]()


def build_network(spec: NetworkSpec, seed: int) -> nn.Sequential:
    """``depth`` blocks and a readout of the same width and init, in float64 (deep gradients underflow float32)."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = [Block(spec) for _ in range(spec.depth)]
    readout = nn.Linear(spec.width, spec.width)
    model = nn.Sequential(*blocks, readout).double()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _initialise(module, spec)
    return model


def _initialise(linear: nn.Linear, spec: NetworkSpec) -> None:
    weight, bias = linear.weight, linear.bias
    with torch.no_grad():
        if spec.init == "normal":
            nn.init.normal_(weight, 0.0, 1.0)
        elif spec.init == "xavier_uniform":
            nn.init.xavier_uniform_(weight)
        elif spec.init == "xavier_normal":
            nn.init.xavier_normal_(weight)
        elif spec.init in ("kaiming_uniform", "kaiming_normal"):
            std = KAIMING_GAIN[spec.activation] / math.sqrt(spec.width)
            if spec.init == "kaiming_normal":
                nn.init.normal_(weight, 0.0, std)
            else:
                nn.init.uniform_(weight, -math.sqrt(3.0) * std, math.sqrt(3.0) * std)
        elif spec.init == "orthogonal":
            nn.init.orthogonal_(weight)
        weight.mul_(spec.weight_scale)
        if spec.bias_std is not None:
            nn.init.normal_(bias, 0.0, spec.bias_std)
        elif spec.init != "default":
            nn.init.zeros_(bias)


def monte_carlo(spec: NetworkSpec) -> tuple[list[list[float]], list[str]]:
    """Per seed, the gradient k layers back from the output relative to the output (k = 1…depth)."""
    runs: list[list[float]] = []
    notes: list[str] = []
    for offset in range(spec.seeds):
        seed = spec.seed + offset
        model = build_network(spec, seed)
        x = torch.randn(BATCH, spec.width, generator=torch.Generator().manual_seed(seed + 10_000), dtype=torch.float64)
        result = probe(model, Batch(args=(x,)), seed=seed)
        linears = [i for i, layer in enumerate(result.layers) if layer.type == "Linear"]
        norms = [result.layers[i].calls[0] for i in linears]
        values = [n.l2 if n is not None else 0.0 for n in norms]
        out = values[-1]
        runs.append([v / out if out else math.nan for v in reversed(values[:-1])])
    underflow = sum(1 for run in runs for v in run if v == 0.0)
    if underflow:
        notes.append(
            f"{underflow} per-layer values underflowed even float64 to exactly 0; the gain is taken over the "
            "non-zero stretch"
        )
    return runs, notes


def simulate_network(spec: NetworkSpec) -> SimulationReport:
    """Theory (where it applies) and Monte Carlo, layer by layer, with their relative difference."""
    spec.validate()
    notes = [
        f"σ_w² = {spec.sigma_w2():.4g}, σ_b² = {spec.sigma_b2():.4g}, input variance 1; "
        f"{spec.depth} layers of width {spec.width} and a readout of the same init; float64, batch {BATCH}"
    ]
    if spec.activation in ("gelu", "silu", "elu") and spec.init.startswith("kaiming"):
        notes.append(f"nn.init.calculate_gain has no entry for {spec.activation}: Kaiming uses ReLU's gain √2")
    theory = None
    theory_values: tuple[float, ...] = ()
    if spec.plain:
        field = mean_field(spec.activation, spec.depth, spec.sigma_w2(), spec.sigma_b2(), 1.0)
        theory_values = field.relative()
        theory = Estimate(gain=field.gain, ratio=field.ratio, depth_scale=depth_scale(field.gain))
        if spec.init == "orthogonal":
            notes.append("theory treats orthogonal weights as Gaussian of the same variance (exact for linear nets)")
        notes.append(f"finite width {spec.width}: Monte Carlo fluctuates around the infinite-width theory")
    else:
        what = " and ".join(
            w for w in ("residual shortcuts" if spec.residual else "", f"{spec.norm} norm" if spec.norm else "") if w
        )
        notes.append(f"the plain mean-field map does not apply with {what}: Monte Carlo only")
    runs, mc_notes = monte_carlo(spec)
    notes += mc_notes
    medians = [statistics.median(run[k] for run in runs) for k in range(spec.depth)]
    gains = [stretch_gain(run) for run in runs]
    ratios = [run[-1] for run in runs]
    mc = Estimate(
        gain=statistics.median(gains),
        ratio=statistics.median(ratios),
        depth_scale=depth_scale(statistics.median(gains)),
        gain_low=min(gains),
        gain_high=max(gains),
        ratio_low=min(ratios),
        ratio_high=max(ratios),
        seeds=spec.seeds,
    )
    layers = tuple(
        SimLayer(
            index=k + 1,
            value=medians[k],
            theory=theory_values[k] if theory_values else None,
            monte_carlo=medians[k],
            low=min(run[k] for run in runs),
            high=max(run[k] for run in runs),
            extra={"relative_difference": _relative(medians[k], theory_values[k])} if theory_values else {},
        )
        for k in range(spec.depth)
    )
    headline = theory or mc
    if theory is not None:
        difference = _relative(mc.gain, theory.gain)
        notes.append(
            f"per-layer gain: theory {theory.gain:.4g}, Monte Carlo {mc.gain:.4g} "
            f"(relative difference {difference:+.2%})"
        )
        if abs(difference) > 0.05:
            notes.append(
                "a gap of more than 5%: at finite width the network drifts from the infinite-width map, most for "
                "activations with a non-zero mean (gelu, silu, elu, sigmoid); it closes as --width grows "
                "(gelu + Kaiming, depth 50: +11% at width 256, +1% at 1024, +0.4% at 2048)"
            )
    return SimulationReport(
        mode="network",
        depth=spec.depth,
        ratio=headline.ratio,
        gain=headline.gain,
        verdict=verdict_of(headline.ratio),
        layers=layers,
        spec=_spec_dict(spec),
        theory=theory,
        monte_carlo=mc,
        notes=tuple(notes),
    )


def _relative(measured: float, predicted: float) -> float:
    if predicted == 0 or not math.isfinite(predicted) or not math.isfinite(measured):
        return math.nan
    return measured / predicted - 1.0


def _spec_dict(spec: NetworkSpec) -> dict[str, object]:
    return {
        "activation": spec.activation, "init": spec.init, "width": spec.width, "weight_scale": spec.weight_scale,
        "bias_std": spec.bias_std, "residual": spec.residual, "norm": spec.norm, "seeds": spec.seeds,
        "sigma_w2": spec.sigma_w2(), "sigma_b2": spec.sigma_b2(),
    }  # fmt: skip


def with_remedy(spec: NetworkSpec, remedy: str) -> NetworkSpec:
    """The spec with one remedy applied (``compare`` mode)."""
    if remedy in ("xavier_normal", "kaiming_normal", "orthogonal"):
        return replace(spec, init=remedy, weight_scale=1.0)
    if remedy == "batch_norm":
        return replace(spec, norm="batch")
    if remedy == "layer_norm":
        return replace(spec, norm="layer")
    if remedy == "residual":
        return replace(spec, residual=True)
    return spec


REMEDIES = ("xavier_normal", "kaiming_normal", "orthogonal", "batch_norm", "layer_norm", "residual")


def simulate_compare(spec: NetworkSpec) -> SimulationReport:
    """The spec as given, then under each remedy, ranked by how close the Monte Carlo gain is to 1."""
    spec.validate()
    rows: list[dict[str, Any]] = []
    baseline: SimulationReport | None = None
    for remedy in ("as given", *REMEDIES):
        variant = with_remedy(spec, remedy)
        result = simulate_network(variant)
        baseline = baseline or result
        mc = result.monte_carlo
        assert mc is not None
        rows.append(
            {
                "remedy": remedy,
                "init": variant.init,
                "norm": variant.norm,
                "residual": variant.residual,
                "theory_gain": result.theory.gain if result.theory else None,
                "gain": mc.gain,
                "ratio": mc.ratio,
                "verdict": verdict_of(mc.ratio),
                "distance": abs(math.log(mc.gain)) if 0 < mc.gain < math.inf else math.inf,
            }
        )
    ranked = sorted(rows, key=lambda row: row["distance"])
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    assert baseline is not None and baseline.monte_carlo is not None
    return SimulationReport(
        mode="compare",
        depth=spec.depth,
        ratio=baseline.monte_carlo.ratio,
        gain=baseline.monte_carlo.gain,
        verdict=verdict_of(baseline.monte_carlo.ratio),
        layers=baseline.layers,
        theory=baseline.theory,
        monte_carlo=baseline.monte_carlo,
        spec=_spec_dict(spec),
        rows=tuple(ranked),
        notes=(
            f"ranked by |ln gain| of the Monte Carlo gain ({spec.seeds} seeds, width {spec.width}); "
            f"best for {spec.activation}: {ranked[0]['remedy']} (gain {ranked[0]['gain']:.4g})",
        ),
    )
