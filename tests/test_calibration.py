"""Calibration: healthy real architectures stay healthy, known pathologies are flagged.

The same models produce the table in docs/calibration.md (``python tests/zoo.py``).
"""

from __future__ import annotations

import pytest

from gradcheck_cli.api import check
from zoo import HEALTHY, SICK, ZooModel


@pytest.mark.parametrize("entry", HEALTHY, ids=[e.name for e in HEALTHY])
def test_no_false_alarm_on_healthy_architecture(entry: ZooModel):
    model, batch = entry.build()
    report = check(model, batch)
    assert report.problems == (), [f.message for f in report.findings]
    assert report.healthy
    assert report.path.attenuation is not None
    # the margin: healthy models sit within ~1.5 orders of magnitude of the output's gradient
    assert 10**-2 < report.path.attenuation < 10**2


@pytest.mark.parametrize("entry", SICK, ids=[e.name for e in SICK])
def test_pathology_is_flagged_with_its_problem(entry: ZooModel):
    model, batch = entry.build()
    report = check(model, batch)
    assert [p.value for p in report.problems] == [entry.expected]
    assert report.recommendations, "a sick model gets at least one recommendation"


def test_relu_xavier_gain_is_one_over_root_two():
    model, batch = next(e for e in SICK if e.name == "relu-xavier-50").build()
    report = check(model, batch)
    assert report.path.gain == pytest.approx(2**-0.5, rel=0.05)


def test_linear_1_2x_gain_is_1_2():
    model, batch = next(e for e in SICK if e.name.startswith("linear-orthogonal")).build()
    report = check(model, batch)
    assert report.path.gain == pytest.approx(1.2, rel=0.02)


def test_relu_kaiming_gain_is_one():
    model, batch = next(e for e in HEALTHY if e.name == "relu-kaiming-50").build()
    assert check(model, batch).path.gain == pytest.approx(1.0, abs=0.02)
