"""How a :class:`~gradcheck_cli.report.report.Report` shows itself: ``print(report)`` and Jupyter's rich display.

The report stage imports nothing of ours beyond itself, so it cannot call a renderer; the renderers register
here instead (dependency inversion). ``gradcheck_cli/__init__.py`` fills the hooks when the package is
imported (:func:`gradcheck_cli.render.notebook.install_display`), which happens before any report exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Renderer = Callable[[Any], str]
"""A function from a report to its text (plain) or its HTML fragment."""

_RENDERERS: dict[str, Renderer] = {}


def set_renderers(*, text: Renderer | None = None, html: Renderer | None = None) -> None:
    """Register the functions ``str(report)`` (``text``) and ``report._repr_html_()`` (``html``) call."""
    for kind, function in (("text", text), ("html", html)):
        if function is not None:
            _RENDERERS[kind] = function


def shown(kind: str, report: Any) -> str | None:
    """``report`` rendered by the ``kind`` hook (``text`` or ``html``), or None when none is registered."""
    function = _RENDERERS.get(kind)
    return None if function is None else function(report)
