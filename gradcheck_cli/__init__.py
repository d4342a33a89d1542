"""gradcheck: does the gradient flow through your PyTorch model, and if not, why and what fixes it.

Importing this package does not import torch; ``check`` and ``Report`` load it on first use. A ``Report``
prints as the text report (``print(report)``) and shows itself in Jupyter (``_repr_html_``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradcheck_cli.render.notebook import install_display
from gradcheck_cli.version import __version__

install_display()  # print(report) and Jupyter show the report (report/display.py; the renderers load on use)

if TYPE_CHECKING:
    from gradcheck_cli.api import check
    from gradcheck_cli.pytest_plugin import assert_gradients_healthy
    from gradcheck_cli.report.report import Report
    from gradcheck_cli.training.monitor import watch

__all__ = ["Report", "__version__", "assert_gradients_healthy", "check", "watch"]


def __getattr__(name: str) -> Any:
    if name == "check":
        from gradcheck_cli.api import check

        return check
    if name == "assert_gradients_healthy":
        from gradcheck_cli.pytest_plugin import assert_gradients_healthy

        return assert_gradients_healthy
    if name == "Report":
        from gradcheck_cli.report.report import Report

        return Report
    if name == "watch":
        from gradcheck_cli.training.monitor import watch

        return watch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
