"""simulate: chain values exactly, theory against closed forms, Monte Carlo against theory, the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.simulate.chain import simulate_chain
from gradcheck_cli.simulate.meanfield import ACTIVATIONS, gaussian_expectation, mean_field
from gradcheck_cli.simulate.network import INITS, NetworkSpec, simulate_compare, simulate_network

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels

# ---------------------------------------------------------------------------------------------- chain


def test_chain_values_are_the_powers_of_the_factor():
    report = simulate_chain(50, 0.8)
    assert report.ratio == pytest.approx(0.8**50, rel=1e-12)
    assert report.ratio == pytest.approx(1.43e-5, rel=2e-3)
    assert [layer.value for layer in report.layers[:3]] == pytest.approx([0.8, 0.64, 0.512], rel=1e-12)
    assert report.gain == 0.8 and report.verdict == "vanishing"
    assert report.crossings == {"vanishing": 31, "exploding": None}  # 0.8**31 = 9.9e-4 < 1e-3 < 0.8**30


def test_chain_exploding_and_stable():
    exploding = simulate_chain(50, 1.2)
    assert exploding.ratio == pytest.approx(9.10e3, rel=1e-3)
    assert exploding.verdict == "exploding" and exploding.crossings["exploding"] == 38  # 1.2**38 = 1020
    assert simulate_chain(10, 1.0).verdict == "stable"


def test_chain_does_not_overflow_or_underflow_into_errors():
    assert simulate_chain(5000, 0.5).ratio == 0.0
    assert simulate_chain(5000, 2.0).ratio == math.inf


@pytest.mark.parametrize(
    ("depth", "factor", "message"),
    [
        (0, 0.8, "--depth must be at least 1, got 0"),
        (10, 0.0, "--factor must be a positive number, got 0.0"),
        (10, -1.0, "--factor must be a positive number, got -1.0"),
        (10, math.nan, "--factor must be a positive number, got nan"),
    ],
)
def test_chain_rejects_bad_input(depth, factor, message):
    with pytest.raises(GradcheckError, match=f"^{re.escape(message)}$"):
        simulate_chain(depth, factor)


def test_chain_json_has_the_contract_keys():
    data = simulate_chain(50, 0.8).to_dict()
    assert {"depth", "ratio", "gain", "verdict", "layers"} <= set(data)
    assert data["layers"][0] == {"index": 1, "value": 0.8}


# ---------------------------------------------------------------------------------------------- theory


@pytest.mark.parametrize("q", [1e-10, 0.01, 1.0, 37.0, 1e4, 1e9])
def test_quadrature_matches_relu_and_linear_closed_forms(q):
    relu, relu_prime = ACTIVATIONS["relu"]
    assert gaussian_expectation(lambda u: relu(u) ** 2, q) == pytest.approx(q / 2, rel=1e-9)
    assert gaussian_expectation(lambda u: relu_prime(u) ** 2, q) == pytest.approx(0.5, rel=1e-9)
    assert gaussian_expectation(lambda u: u**2, q) == pytest.approx(q, rel=1e-9)


@pytest.mark.parametrize("q", [1e3, 1e5, 1e8])
def test_quadrature_resolves_the_narrow_tanh_derivative_at_large_q(q):
    """E[sech⁴(√q z)] → (4/3)/√(2πq) as q grows; fixed 100-node Gauss–Hermite misses this badly."""
    tanh_prime = ACTIVATIONS["tanh"][1]
    expected = (4.0 / 3.0) / math.sqrt(2 * math.pi * q)
    assert gaussian_expectation(lambda u: tanh_prime(u) ** 2, q) == pytest.approx(expected, rel=5e-4)


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 2.0, 3.0])
def test_relu_chi_is_half_sigma_w2_and_linear_chi_is_sigma_w2(sigma_w2):
    relu = mean_field("relu", 10, sigma_w2, 0.0, 1.0)
    assert relu.chi == pytest.approx([sigma_w2 / 2] * 10, rel=1e-9)
    assert relu.q[1] == pytest.approx(sigma_w2 * sigma_w2 / 2, rel=1e-9)  # q2 = σ_w²·q1/2, q1 = σ_w²
    linear = mean_field("linear", 10, sigma_w2, 0.0, 1.0)
    assert linear.chi == pytest.approx([sigma_w2] * 10, rel=1e-9)


def test_known_values_relu_kaiming_xavier_and_linear_1_2():
    assert simulate_network(NetworkSpec(5, "relu", "kaiming_normal", seeds=1)).theory.gain == pytest.approx(1.0)
    xavier = NetworkSpec(5, "relu", "xavier_normal", seeds=1)
    assert simulate_network(xavier).theory.gain == pytest.approx(2**-0.5)
    scaled = NetworkSpec(5, "linear", "orthogonal", weight_scale=1.2, seeds=1)
    assert simulate_network(scaled).theory.gain == pytest.approx(1.2)


def test_theory_per_layer_values_run_from_the_output_and_match_monte_carlo_at_both_ends():
    """Sigmoid with N(0, 1) weights: q and χ change with depth, so a reversed index would show."""
    field = mean_field("sigmoid", 12, 256.0, 0.0, 1.0)
    relative = field.relative()
    assert relative[0] == pytest.approx(math.sqrt(field.chi[-1]))
    assert relative[-1] == pytest.approx(field.ratio)
    assert field.chi[0] != pytest.approx(field.chi[-1], rel=0.05)
    report = simulate_network(NetworkSpec(12, "sigmoid", "normal", width=256))
    first, last = report.layers[0], report.layers[-1]
    assert first.monte_carlo == pytest.approx(first.theory, rel=0.1)
    assert last.monte_carlo == pytest.approx(last.theory, rel=0.15)


def test_depth_scale_is_minus_one_over_log_gain():
    theory = simulate_network(NetworkSpec(5, "relu", "xavier_normal", seeds=1)).theory
    assert theory.depth_scale == pytest.approx(-1 / math.log(2**-0.5))


# ---------------------------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize(
    ("activation", "init", "scale", "tolerance"),
    [
        ("relu", "kaiming_normal", 1.0, 0.02),
        ("relu", "xavier_normal", 1.0, 0.02),
        ("linear", "orthogonal", 1.2, 0.001),
        ("tanh", "xavier_normal", 1.0, 0.02),
        ("tanh", "normal", 1.0, 0.02),
        ("sigmoid", "default", 1.0, 0.02),
    ],
)
def test_monte_carlo_gain_within_tolerance_of_theory(activation, init, scale, tolerance):
    """Width 256, depth 30, 3 seeds: the per-layer gain agrees with infinite-width theory within 2 %."""
    report = simulate_network(NetworkSpec(30, activation, init, width=256, weight_scale=scale))
    assert report.monte_carlo.gain == pytest.approx(report.theory.gain, rel=tolerance)


def test_monte_carlo_gain_survives_gradients_below_float32_range():
    """Sigmoid with default init: 0.14 per layer, 1e-43 over 50 layers (float32 would flush it to zero)."""
    report = simulate_network(NetworkSpec(50, "sigmoid", "default", width=128, seeds=2))
    assert report.monte_carlo.ratio < 1e-38
    assert report.monte_carlo.ratio > 0
    assert report.monte_carlo.gain == pytest.approx(report.theory.gain, rel=0.02)


def test_residual_and_norm_are_monte_carlo_only_with_a_note():
    report = simulate_network(NetworkSpec(20, "relu", "kaiming_normal", residual=True, norm="layer", seeds=1))
    assert report.theory is None
    assert any("does not apply" in note for note in report.notes)
    assert report.gain == report.monte_carlo.gain


def test_compare_ranks_kaiming_first_for_relu_and_a_normaliser_for_sigmoid():
    relu = simulate_compare(NetworkSpec(30, "relu", "xavier_normal", width=128, seeds=1))
    assert relu.rows[0]["remedy"] == "kaiming_normal"
    assert [row["rank"] for row in relu.rows] == list(range(1, 8))
    sigmoid = simulate_compare(NetworkSpec(30, "sigmoid", "default", width=128, seeds=1))
    assert sigmoid.rows[0]["remedy"] in ("batch_norm", "layer_norm", "residual")
    assert sigmoid.rows[-1]["verdict"] == "vanishing"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (NetworkSpec(0, "relu", "default"), "--depth must be at least 1, got 0"),
        (NetworkSpec(5, "swish", "default"), f"--activation 'swish' is not one of: {', '.join(ACTIVATIONS)}"),
        (NetworkSpec(5, "relu", "lecun"), f"--init 'lecun' is not one of: {', '.join(INITS)}"),
        (NetworkSpec(5, "relu", "default", norm="group"), "--norm 'group' is not one of: batch, layer"),
        (NetworkSpec(5, "relu", "default", weight_scale=0.0), "--weight-scale must be in (0, 1e+06], got 0.0"),
    ],
)
def test_network_rejects_bad_specs(spec, message):
    with pytest.raises(GradcheckError, match=f"^{re.escape(message)}$"):
        simulate_network(spec)


# ---------------------------------------------------------------------------------------------- CLI


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "simulate", *args], capture_output=True, text=True, timeout=120
    )


def test_chain_mode_cli_imports_no_torch_and_prints_json():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gradcheck_cli", "simulate", "--depth", "50", "--factor", "0.8",
         "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "numpy" not in imported
    data = json.loads(proc.stdout)
    assert data["ratio"] == pytest.approx(1.4272476927059631e-05)
    assert data["verdict"] == "vanishing"


def test_network_mode_cli_json_has_theory_and_monte_carlo():
    proc = run("--depth", "10", "--activation", "relu", "--init", "xavier_normal", "--width", "64", "--seeds", "2",
               "--format", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"gain", "ratio"} <= set(data["theory"]) and {"gain", "ratio"} <= set(data["monte_carlo"])
    assert data["theory"]["gain"] == pytest.approx(2**-0.5)
    assert len(data["layers"]) == 10 and "relative_difference" in data["layers"][0]


def test_simulate_text_shows_chart_and_verdict():
    proc = run("--depth", "50", "--factor", "1.2")
    assert proc.returncode == 0
    assert "│" in proc.stdout and "verdict: exploding" in proc.stdout


def test_simulate_bad_flags_exit_2_in_one_line():
    proc = run("--activation", "swish", "--depth", "3")
    assert proc.returncode == 2 and "swish" in proc.stderr and "Traceback" not in proc.stderr
    assert run("--factor", "-1").returncode == 2


def test_every_mode_json_follows_the_contract():
    from gradcheck_cli.simulate.logistic import simulate_logistic_map
    from gradcheck_cli.simulate.rnn import simulate_rnn

    reports = [
        simulate_chain(20, 0.9),
        simulate_network(NetworkSpec(5, "tanh", "xavier_normal", width=32, seeds=1)),
        simulate_compare(NetworkSpec(5, "relu", "default", width=32, seeds=1)),
        simulate_logistic_map(3.5, 4),
        simulate_rnn(10, 0.9, hidden=16, seeds=1),
    ]
    for report in reports:
        data = json.loads(json.dumps(report.to_dict()))
        assert isinstance(data["depth"], int) and data["depth"] > 0
        assert isinstance(data["ratio"], (int, float, str)) and isinstance(data["gain"], (int, float, str))
        assert data["verdict"] in ("vanishing", "exploding", "stable")
        assert isinstance(data["layers"], list)
        assert all(isinstance(layer["index"], int) and "value" in layer for layer in data["layers"])
    assert {"gain", "ratio"} <= set(reports[1].to_dict()["theory"])
    assert [row["rank"] for row in reports[2].to_dict()["rows"]] == list(range(1, 8))


def test_conflicting_modes_and_out_of_range_specs_exit_2():
    for args in (("--factor", "0.8", "--rnn"), ("--map", "logistic", "--compare"), ("--weight-scale", "1e200"),
                 ("--width", "1000000000")):  # fmt: skip
        proc = run(*args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------ the header in words (issue 19)


def test_the_text_says_what_the_depth_scale_is_and_when_a_crossing_is_extrapolated():
    from gradcheck_cli.render.simulate_text import render_simulation_text

    short = render_simulation_text(simulate_chain(10, 0.9))
    assert "depth_scale=" not in short  # not a bare key: said in words
    assert "depth scale ξ = 9.491 layers: the gradient falls by a factor e (≈ 2.72) every ξ layers" in short
    assert "crosses below 1e-3 at 66 layers (extrapolated: factor**k continued past --depth 10)" in short
    deep = render_simulation_text(simulate_chain(100, 0.9))
    assert "crosses below 1e-3 at 66 layers\n" in deep  # within the simulated depth: measured, not extrapolated
    growing = render_simulation_text(simulate_chain(10, 1.1))
    assert "the gradient grows by a factor e (≈ 2.72) every 10.49 layers" in growing
    network = render_simulation_text(simulate_network(NetworkSpec(5, "tanh", "xavier_normal", width=32, seeds=1)))
    assert "theory's depth scale ξ = " in network and "falls by a factor e" in network


def test_the_cli_prints_the_depth_scale_in_words():
    proc = run("--depth", "10", "--factor", "0.9")
    assert proc.returncode == 0, proc.stderr
    assert "falls by a factor e" in proc.stdout and "(extrapolated" in proc.stdout
