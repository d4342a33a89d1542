"""Number formats shared by the renderers."""

from __future__ import annotations

import math


def count(n: int) -> str:
    """``124_439_808`` → ``124M``: parameter counts at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def number(value: float | None, spec: str = ".3g") -> str:
    """A float for tables and prose: ``–`` when missing, ``nan``/``inf``/``-inf`` spelled out."""
    if value is None:
        return "–"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)
