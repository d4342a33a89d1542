"""Number formats shared by the renderers."""

from __future__ import annotations


def count(n: int) -> str:
    """``124_439_808`` → ``124M``: parameter counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)
