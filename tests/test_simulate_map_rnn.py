"""``simulate --map logistic`` and ``simulate --rnn`` against their closed forms."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.simulate.logistic import DEFAULT_POINTS, derivatives, grid, magnitudes, simulate_logistic_map
from gradcheck_cli.simulate.rnn import simulate_rnn

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels

M = DEFAULT_POINTS

# ---------------------------------------------------------------- the logistic map


@pytest.mark.parametrize("r", [0.5, 1.0, 2.5, 3.5, 4.0])
def test_map_maximum_is_r_to_the_n_at_the_ends_of_the_interval(r: float) -> None:
    report = simulate_logistic_map(r, 6)
    assert report.layers[0].value == pytest.approx(r, rel=1e-15)  # n = 1: |f'(0)| = |f'(1)| = r
    for layer in report.layers:
        assert layer.value == pytest.approx(r**layer.index, rel=1e-14)
    assert report.ratio == pytest.approx(r**6, rel=1e-14)
    assert report.gain == r


def test_map_r4_second_iteration_maximum_is_16_at_x0() -> None:
    report = simulate_logistic_map(4.0, 2)
    assert report.layers[1].value == 16.0
    assert report.ratio == 16.0
    mantissa, exponent = list(derivatives(4.0, 2))[-1]
    assert magnitudes(mantissa, exponent)[0] == 16.0  # grid()[0] is x = 0
    assert grid()[0] == 0.0


@pytest.mark.parametrize("r", [3.0, 3.5, 4.0])
def test_map_first_iteration_share_below_matches_closed_form(r: float) -> None:
    # |r(1 − 2x)| < 1e-3  ⟺  |x − ½| < 5e-4/r: a set of measure 1e-3/r
    share = simulate_logistic_map(r, 1).layers[0].extra["share_below_1e-3"]
    assert share == pytest.approx(1e-3 / r, abs=2 / M)
    half_width_in_steps = 5e-4 / r * (M - 1)  # not an integer for these r
    assert share == (2 * math.floor(half_width_in_steps) + 1) / M  # the exact count of grid points


@pytest.mark.parametrize("r", [1.0, 3.5, 4.0])
def test_map_first_iteration_median_is_half_of_r(r: float) -> None:
    # |1 − 2x| is uniform on [0, 1] for uniform x, so the median of |f'| is r/2
    layer = simulate_logistic_map(r, 1).layers[0]
    assert layer.extra["median_abs_derivative"] == pytest.approx(r / 2, rel=1e-12)
    assert layer.extra["share_above_1e3"] == 0.0


def test_map_r2_matches_closed_form_at_every_grid_point() -> None:
    # r = 2: 1 − 2fⁿ(x) = (1 − 2x)^(2ⁿ), so d fⁿ/dx = 2ⁿ·u^(2ⁿ − 1) with u = 1 − 2x
    u = 1.0 - 2.0 * grid()
    for n, (mantissa, exponent) in enumerate(derivatives(2.0, 6), 1):
        got = magnitudes(mantissa, exponent)
        with np.errstate(under="ignore"):
            expected = 2.0**n * np.abs(u) ** (2**n - 1)
        normal = expected > 1e-280
        np.testing.assert_allclose(got[normal], expected[normal], rtol=1e-12)
        assert (got[~normal] < 1e-270).all()


def test_map_r2_shares_and_median_match_closed_form() -> None:
    n = 6
    last = simulate_logistic_map(2.0, n).layers[-1].extra
    # 2ⁿ|u|^(2ⁿ−1) < 1e-3  ⟺  |u| < (1e-3/2ⁿ)^(1/(2ⁿ−1)), u uniform on [−1, 1]
    assert last["share_below_1e-3"] == pytest.approx((1e-3 / 2**n) ** (1 / (2**n - 1)), abs=2 / M)
    assert last["share_above_1e3"] == 0.0
    assert last["median_abs_derivative"] == pytest.approx(2.0**n * 0.5 ** (2**n - 1), rel=1e-12)  # median |u| = ½


def test_map_r4_matches_conjugacy_closed_form_at_every_grid_point() -> None:
    # r = 4: x = sin²θ gives fⁿ(x) = sin²(2ⁿθ), so |d fⁿ/dx| = 2ⁿ|sin(2ⁿφ) / sin φ| with φ = 2θ = arccos(1 − 2x)
    phi = np.arccos(1.0 - 2.0 * grid())[1:-1]  # the ends are limits (4ⁿ), checked above
    for n, (mantissa, exponent) in enumerate(derivatives(4.0, 6), 1):
        expected = 2.0**n * np.abs(np.sin(2.0**n * phi) / np.sin(phi))
        np.testing.assert_allclose(magnitudes(mantissa, exponent)[1:-1], expected, rtol=0, atol=1e-9 * 4.0**n)


def test_map_grid_converges() -> None:
    coarse = simulate_logistic_map(3.5, 6).layers[-1].extra
    fine = simulate_logistic_map(3.5, 6, points=1_000_001).layers[-1].extra
    assert coarse["share_below_1e-3"] == pytest.approx(fine["share_below_1e-3"], abs=1e-4)
    assert coarse["share_above_1e3"] == pytest.approx(fine["share_above_1e3"], abs=1e-4)
    assert coarse["median_abs_derivative"] == pytest.approx(fine["median_abs_derivative"], rel=1e-3)


def test_map_derivative_beyond_the_float_range_reads_inf_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = simulate_logistic_map(4.0, 520, points=1001)
    assert report.layers[510].value == 2.0**1022  # 4**511, still exact
    assert report.layers[511].value == math.inf  # 4**512 = 2**1024
    assert report.ratio == math.inf
    assert report.gain == 4.0
    assert report.verdict == "exploding"


def test_map_verdict_follows_the_majority_of_starting_points() -> None:
    superstable = simulate_logistic_map(2.0, 6)
    assert superstable.verdict == "vanishing"
    # closed form share (1e-3/2ⁿ)^(1/(2ⁿ−1)) first reaches ½ at n = 4 (0.277 at n = 3, 0.524 at n = 4)
    assert superstable.crossings == {"vanishing": 4, "exploding": None}
    chaotic = simulate_logistic_map(4.0, 20)
    assert chaotic.verdict == "exploding"
    assert chaotic.spec["typical_gain"] == pytest.approx(2.0, rel=0.02)  # Lyapunov exponent ln 2
    seed_example = simulate_logistic_map(3.5, 6)  # worst case 3.5**6 ≈ 1838, but the typical x is fine
    assert seed_example.ratio > 1e3
    assert seed_example.verdict == "stable"
    assert simulate_logistic_map(3.5, 50).verdict == "vanishing"  # the attracting 4-cycle


def test_map_report_has_the_design_keys() -> None:
    data = json.loads(json.dumps(simulate_logistic_map(3.5, 6).to_dict()))
    assert data["mode"] == "map"
    assert data["depth"] == 6
    assert {"ratio", "gain", "verdict", "layers", "notes"} <= data.keys()
    assert [layer["index"] for layer in data["layers"]] == [1, 2, 3, 4, 5, 6]
    assert {"value", "share_below_1e-3", "share_above_1e3", "median_abs_derivative"} <= data["layers"][0].keys()


def test_map_module_imports_no_torch() -> None:
    code = "import sys, gradcheck_cli.simulate.logistic; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "torch" not in out.stderr


R_RANGE = "--r must be a number in (0, 4] so that f maps [0, 1] into itself, got "


@pytest.mark.parametrize(
    ("r", "iterations", "points", "message"),
    [
        (0.0, 6, M, R_RANGE + "0.0"),
        (-1.0, 6, M, R_RANGE + "-1.0"),
        (4.5, 6, M, R_RANGE + "4.5"),
        (math.nan, 6, M, R_RANGE + "nan"),
        (math.inf, 6, M, R_RANGE + "inf"),
        (3.5, 0, M, "--iterations must be a whole number of at least 1, got 0"),
        (3.5, -2, M, "--iterations must be a whole number of at least 1, got -2"),
        (3.5, 6, 2, "the grid needs at least 3 points, got 2"),
    ],
)
def test_map_rejects_bad_inputs_with_one_line(r: float, iterations: int, points: int, message: str) -> None:
    with pytest.raises(GradcheckError, match=f"^{re.escape(message)}$") as error:
        simulate_logistic_map(r, iterations, points=points)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- backpropagation through time


def test_rnn_linear_cell_ratio_is_exactly_radius_to_the_t_minus_1() -> None:
    report = simulate_rnn(50, 0.9, cell="linear")
    assert report.ratio == pytest.approx(0.9**49, rel=1e-10)
    assert report.gain == pytest.approx(0.9, rel=1e-12)
    assert report.theory is not None
    assert report.theory.ratio == pytest.approx(0.9**49, rel=1e-14)
    for layer in report.layers:
        assert layer.low == pytest.approx(0.9**layer.index, rel=1e-10)
        assert layer.high == pytest.approx(0.9**layer.index, rel=1e-10)


def test_rnn_tanh_radius_half_vanishes_below_the_linear_bound() -> None:
    report = simulate_rnn(200, 0.5)
    assert report.verdict == "vanishing"
    assert 0 < report.ratio < 1e-60  # measured ≈ 4e-65, float64 keeps it
    assert 0.45 < report.gain < 0.5  # measured ≈ 0.475: tanh' ≤ 1 only shrinks ρ = 0.5
    assert report.theory is not None
    assert report.theory.ratio == pytest.approx(0.5**199, rel=1e-12)
    for layer in report.layers:
        assert layer.theory is not None and layer.high is not None
        assert layer.high <= layer.theory * (1 + 1e-9)
    assert report.crossings["vanishing"] == 10  # 0.5**10 ≈ 1e-3, a little earlier with tanh


def test_rnn_tanh_radius_two_explodes() -> None:
    report = simulate_rnn(200, 2.0, hidden=256)
    assert report.verdict == "exploding"
    assert report.ratio > 1e10  # measured ≈ 5e13; the linear bound 2**199 ≈ 8e59 is far above
    assert 1.1 < report.gain < 1.25  # measured ≈ 1.17: saturation eats most of ρ = 2
    assert report.monte_carlo is not None and report.monte_carlo.ratio_low is not None
    assert report.monte_carlo.ratio_low > 1e3


def test_rnn_lstm_orthogonal_radius_one_still_vanishes() -> None:
    # The honest value: with PyTorch's default forget-gate bias (≈ 0, so f ≈ ½) the state gradient
    # loses ~27% per step even though every recurrent block is exactly orthogonal.
    report = simulate_rnn(200, 1.0, cell="lstm")
    assert report.verdict == "vanishing"
    assert report.theory is None
    assert 0.70 < report.gain < 0.76  # measured ≈ 0.729
    assert 1e-30 < report.ratio < 1e-25  # measured ≈ 5.5e-28
    assert any("(h_t, c_t)" in note for note in report.notes)


def test_rnn_gru_has_no_theory_line_and_gains_below_one_at_radius_one() -> None:
    report = simulate_rnn(100, 1.0, cell="gru")
    assert report.theory is None
    assert report.gain < 1
    assert report.verdict == "vanishing"


@pytest.mark.parametrize(("steps", "dtype"), [(200, torch.float32), (700, torch.float64)])
def test_rnn_underflow_reads_zero_and_gain_uses_the_nonzero_stretch(steps: int, dtype: torch.dtype) -> None:
    report = simulate_rnn(steps, 0.5, dtype=dtype)
    assert report.ratio == 0.0
    assert report.verdict == "vanishing"
    values = [layer.value for layer in report.layers]
    assert all(math.isfinite(v) for v in values)
    first_zero = values.index(0.0)
    assert all(v == 0.0 for v in values[first_zero:])  # once below the floor, it stays there
    assert report.gain == pytest.approx(0.4747, abs=0.005)  # the float64 T = 200 gain
    assert any("read 0" in note for note in report.notes)


def test_rnn_report_covers_every_step_distance() -> None:
    report = simulate_rnn(30, 0.9, seeds=4, seed=7)
    assert report.mode == "rnn"
    assert report.depth == 30
    assert [layer.index for layer in report.layers] == list(range(1, 30))
    assert report.ratio == report.layers[-1].value
    for layer in report.layers:
        assert layer.low is not None and layer.high is not None
        assert layer.low <= layer.value <= layer.high
    assert report.monte_carlo is not None
    assert report.monte_carlo.seeds == 4
    data = json.loads(json.dumps(report.to_dict()))
    assert {"depth", "ratio", "gain", "verdict", "layers", "theory", "monte_carlo"} <= data.keys()


def test_rnn_is_reproducible() -> None:
    """The same call gives the same report (its speed is not asserted here: timed assertions fail on a shared,
    noisy machine)."""
    first = simulate_rnn(200, 0.9)
    assert first == simulate_rnn(200, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 1, "radius": 0.5}, "--steps must be a whole number of at least 2, got 1"),
        ({"steps": 0, "radius": 0.5}, "--steps must be a whole number of at least 2, got 0"),
        ({"steps": 20, "radius": 0.0}, "--radius must be a positive number, got 0.0"),
        ({"steps": 20, "radius": -1.0}, "--radius must be a positive number, got -1.0"),
        ({"steps": 20, "radius": math.nan}, "--radius must be a positive number, got nan"),
        ({"steps": 20, "radius": math.inf}, "--radius must be a positive number, got inf"),
        (
            {"steps": 20, "radius": 0.5, "cell": "transformer"},
            "--cell must be one of rnn, lstm, gru, linear, got 'transformer'",
        ),
        ({"steps": 20, "radius": 0.5, "hidden": 0}, "--hidden must be a whole number of at least 1, got 0"),
        ({"steps": 20, "radius": 0.5, "seeds": 0}, "--seeds must be a whole number of at least 1, got 0"),
    ],
)
def test_rnn_rejects_bad_inputs_with_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(GradcheckError, match=f"^{re.escape(message)}$") as error:
        simulate_rnn(**kwargs)
    assert "\n" not in str(error.value)
