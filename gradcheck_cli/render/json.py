"""The JSON report of DESIGN.md §3."""

from __future__ import annotations

import json

from gradcheck_cli.report.report import Report
from gradcheck_cli.simulate.report import SimulationReport


def render_json(report: Report | SimulationReport) -> str:
    """One JSON object (an ``inspect`` or a ``simulate`` report), pretty-printed, ending with a newline."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"
