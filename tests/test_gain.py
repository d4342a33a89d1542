"""The shared per-step gain over the measurable stretch of a path."""

from __future__ import annotations

import math

import pytest

from gradcheck_cli.diagnose.gain import stretch_gain

pytestmark = pytest.mark.numeric  # .ci/run repeats these under other CPU kernels


def test_gain_is_the_geometric_mean_to_the_farthest_step():
    assert stretch_gain([0.5, 0.25, 0.125]) == pytest.approx(0.5)


def test_underflow_further_back_does_not_hide_the_factor_before_it():
    assert stretch_gain([0.5, 0.25, 0.0, 0.0]) == pytest.approx(0.5)
    assert stretch_gain([0.0, 0.0]) == 0.0


def test_overflow_further_back_is_an_infinite_gain():
    assert stretch_gain([2.0, 4.0, math.inf]) == math.inf


def test_nan_is_skipped_like_an_underflow():
    assert stretch_gain([0.5, math.nan]) == pytest.approx(0.5)
