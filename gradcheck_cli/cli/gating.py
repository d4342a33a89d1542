"""The CI gate's flags, shared by ``inspect`` and ``history``: which findings count, and what fails the run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradcheck_cli.exitcodes import ExitCode

if TYPE_CHECKING:
    from gradcheck_cli.gate.fail_on import FailOn
    from gradcheck_cli.gate.policy import Policy
    from gradcheck_cli.report.report import Report


@dataclass(frozen=True)
class Gate:
    """``--select``/``--ignore``/``--ignore-layer`` (the policy), ``--fail-on`` and ``--exit-zero``."""

    policy: Policy
    fail_on: FailOn
    exit_zero: bool

    @classmethod
    def of(
        cls, fail_on: list[str] | None, select: list[str] | None, ignore: list[str] | None,
        ignore_layer: list[str] | None, exit_zero: bool,
    ) -> Gate:  # fmt: skip
        """The gate the flags ask for; an unknown rule code or ``--fail-on`` word is a one-line error."""
        from gradcheck_cli.gate.fail_on import parse_fail_on
        from gradcheck_cli.gate.policy import Policy

        verdict = parse_fail_on(fail_on or [])
        return cls(Policy.build(select or [], ignore or [], ignore_layer or []), verdict, exit_zero)

    def exit_code(self, report: Report) -> ExitCode:
        """1 when the report fails the gate (and the run is not advisory), else 0."""
        return ExitCode.PROBLEMS if self.fail_on.fails(report) and not self.exit_zero else ExitCode.OK
