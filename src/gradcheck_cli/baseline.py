"""Baselines: store a report, then judge a later run only by what got worse (``--baseline``)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.report import BaselineDiff, Finding, LayerMove, Problem, Report, Severity

DEFAULT_TOLERANCE = 1.0
"""Orders of magnitude a layer's relative gradient may move before it counts as a change."""


def write_baseline(report: Report, path: Path) -> None:
    """Store the report as JSON (the same object as ``--format json``)."""
    try:
        path.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise GradcheckError(f"cannot write --write-baseline {path}: {exc.strerror or exc}") from None


def read_baseline(path: Path) -> dict[str, Any]:
    """A stored baseline: plain JSON, nothing executed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GradcheckError(f"cannot read --baseline {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradcheckError(f"--baseline {path} is not a gradcheck JSON report: {exc}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("findings"), list)
        or not isinstance(data.get("layers"), list)
    ):
        raise GradcheckError(f"--baseline {path} is not a gradcheck JSON report (write one with --write-baseline)")
    return data


def compare(report: Report, path: Path, tolerance: float = DEFAULT_TOLERANCE) -> Report:
    """The report with its :class:`BaselineDiff` against the baseline stored at ``path``."""
    if not math.isfinite(tolerance) or tolerance < 0:
        raise GradcheckError(f"--tolerance must be zero or positive (orders of magnitude), got {tolerance}")
    data = read_baseline(path)
    before = {(f.get("code"), f.get("layer")) for f in data["findings"] if isinstance(f, dict)}
    now = {(f.code, f.layer) for f in report.findings}
    new = tuple(f for f in report.findings if (f.code, f.layer) not in before and f.severity is not Severity.INFO)
    fixed = tuple(
        _finding(f) for f in data["findings"] if isinstance(f, dict) and (f.get("code"), f.get("layer")) not in now
    )
    old_rel = {
        entry.get("name"): entry.get("act_grad_rel")
        for entry in data["layers"]
        if isinstance(entry, dict) and isinstance(entry.get("act_grad_rel"), (int, float))
    }
    worse: list[LayerMove] = []
    better: list[LayerMove] = []
    for layer in report.layers:
        previous = old_rel.get(layer.name)
        current = layer.act_grad_rel
        if previous is None or current is None or not (previous > 0 and current > 0) or not math.isfinite(current):
            continue
        move = LayerMove(layer.name, float(previous), current)
        if abs(move.orders) <= tolerance:
            continue
        (better if abs(math.log10(current)) < abs(math.log10(previous)) else worse).append(move)
    diff = BaselineDiff(
        baseline=str(path),
        tolerance=tolerance,
        new_findings=new,
        fixed_findings=fixed,
        worse_layers=tuple(worse),
        better_layers=tuple(better),
    )
    return replace(report, baseline=diff)


def _finding(entry: dict[str, Any]) -> Finding:
    severity = entry.get("severity")
    problem = entry.get("problem")
    return Finding(
        code=str(entry.get("code")),
        name=str(entry.get("name", "")),
        severity=Severity(severity) if severity in {s.value for s in Severity} else Severity.INFO,
        problem=Problem(problem) if problem in {p.value for p in Problem} else None,
        layer=entry.get("layer") if isinstance(entry.get("layer"), str) else None,
        message=str(entry.get("message", "")),
    )
