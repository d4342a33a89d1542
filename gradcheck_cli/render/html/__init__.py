"""The HTML report (:func:`render_html`), its one script and the CSP hash that allows it."""

from gradcheck_cli.render.html.page import SCRIPT, render_html, script_hash

__all__ = ["SCRIPT", "render_html", "script_hash"]
