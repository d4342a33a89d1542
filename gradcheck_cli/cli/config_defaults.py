"""``[tool.gradcheck]`` as the defaults of ``inspect``'s flags, through click's own ``default_map``.

``--config`` is an eager option: its callback reads the configuration (``--config FILE``, else the nearest
``pyproject.toml``) before any other flag is resolved, and gives click a default for every configured key.
A flag written on the command line then wins by click's own rule. Each default is a callable, which click
calls only for a flag that was left out: a configured value is checked (and refused, naming its file) only
when it is used. Whether a value came from the file is click's to say (:func:`from_config`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.gate.config import KEYS, Config, load_config
from gradcheck_cli.render.registry import ReportFormat

PARAMETERS = {
    "model": "model",
    "input": "batch",
    "format": "output_format",
    "fail_on": "fail_on",
    "select": "select",
    "ignore": "ignore",
    "ignore_layers": "ignore_layer",
    "vanishing_below": "vanishing_below",
    "exploding_above": "exploding_above",
    "tolerance": "tolerance",
    "baseline": "baseline",
    "seed": "seed",
    "device": "device",
    "eval": "eval_mode",
    "max_memory": "max_memory",
}
"""Each ``[tool.gradcheck]`` key (``gate.config.KEYS``) and the ``inspect`` parameter it sets the default of."""
CONFIG = "gradcheck.config"
"""``ctx.meta`` key of the :class:`Config` the run read."""


def apply_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """The eager ``--config`` callback: read the configuration and make its values the other flags' defaults."""
    config = load_config(value)
    ctx.meta[CONFIG] = config
    defaults = {PARAMETERS[key]: _reader(config, key) for key in config.values}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def configuration(ctx: typer.Context) -> Config:
    """The configuration this run read (none: an empty one)."""
    config = ctx.meta.get(CONFIG)
    return config if isinstance(config, Config) else Config()


def from_config(ctx: typer.Context, name: str) -> bool:
    """Whether parameter ``name`` took its value from the configuration (not the command line)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "DEFAULT_MAP"


def given(ctx: typer.Context, name: str) -> bool:
    """Whether parameter ``name`` was written on the command line."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _reader(config: Config, key: str) -> Callable[[], Any]:
    """How the default of ``key``'s flag is read from ``config``: paths relative to the file, lists as lists."""
    if key in ("input", "baseline"):
        return lambda: config.path(key)
    if key == "model":
        return config.resolved_model  # the trust rule applies where the model is used (inspect_cmd)
    if key == "seed":
        return config.seed
    if key == "format":
        return lambda: _valid_formats(config.strings("format"))
    if list in KEYS[key]:
        return lambda: config.strings(key)
    return lambda: config.values[key]


def _valid_formats(names: list[str]) -> list[str]:
    choices = {f.value for f in ReportFormat}
    for name in names:
        if name not in choices:
            raise GradcheckError(f"format {name!r} in [tool.gradcheck] is not one of: {', '.join(sorted(choices))}")
    return names
