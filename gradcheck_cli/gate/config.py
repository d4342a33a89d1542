"""``[tool.gradcheck]`` in ``pyproject.toml``: team defaults that command-line flags override.

Trust rule for keys that name code (:data:`CODE_KEYS`: ``model``): the configuration file is found by
walking up from the working directory, so it comes with whatever repository gradcheck runs in, and a
``model = "evil.py:build"`` there would import and run that file. gradcheck runs code only when the user
names it on the command line: ``--model`` (which replaces the configured value) or ``--trust``. Without
either, a configured ``model`` is refused (exit 2) with a line naming the file, the key, the code, and both
ways to allow it; with ``--trust`` it is used and the report notes which file named it. The other keys
only choose settings and paths of data files that are read as tensors, so they apply as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.parsing import MalformedDocument, loads_toml

KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "input": (str,),
    "format": (str, list),
    "fail_on": (str, list),
    "select": (str, list),
    "ignore": (str, list),
    "ignore_layers": (str, list),
    "vanishing_below": (float, int),
    "exploding_above": (float, int),
    "tolerance": (float, int),
    "baseline": (str,),
    "seed": (int,),
    "device": (str,),
    "eval": (bool,),
    "max_memory": (str,),
}
"""Allowed keys and their TOML types. ``trust`` is deliberately absent: unpickling code is a per-run decision."""
CODE_KEYS = ("model",)
"""Keys whose value names code that gradcheck would import and run: used only with ``--trust``."""


@dataclass(frozen=True)
class Config:
    """Values from ``[tool.gradcheck]`` (keys normalised to snake_case) and the file they came from."""

    values: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def get(self, key: str, default: Any = None) -> Any:
        """The configured value, or ``default``."""
        return self.values.get(key, default)

    def strings(self, key: str) -> list[str]:
        """A string-or-list key as a list of strings."""
        value = self.values.get(key)
        if value is None:
            return []
        return [value] if isinstance(value, str) else [str(v) for v in value]

    def model_spec(self, *, trust: bool) -> str | None:
        """``model``, with a ``file.py:factory`` path taken relative to the config file's directory.

        It names code, so it is used only with ``trust`` (``--trust``); otherwise a configured ``model``
        raises :class:`GradcheckError` saying which file names which code and how to allow it.
        """
        spec = self.resolved_model()
        if spec is not None and not trust:
            raise GradcheckError(
                f"{self.source} names code to import and run ([tool.gradcheck] model = {self.values['model']!r}), "
                f"and gradcheck runs code from a configuration file only with --trust; pass --trust if you trust "
                f"this file, or name the model yourself with --model {spec}"
            )
        return spec

    def model_note(self) -> str | None:
        """For the report of a run that used the configured ``model``: which file named that code."""
        spec = self.resolved_model()
        if spec is None:
            return None
        return f"--trust: imported and ran model {spec}, named by [tool.gradcheck] in {self.source}"

    def resolved_model(self) -> str | None:
        """``model`` as configured, a ``file.py:factory`` path taken relative to the config file; not checked
        against the trust rule (:meth:`model_spec` is)."""
        spec = self.values.get("model")
        if spec is None or self.source is None:
            return spec
        module_part, sep, attr = spec.rpartition(":")
        if sep and module_part.endswith(".py") and not Path(module_part).is_absolute():
            return f"{self.source.parent / module_part}:{attr}"
        return spec

    def seed(self) -> int:
        """``seed`` (0 by default), in the range the command line accepts."""
        value = int(self.values.get("seed", 0))
        if not 0 <= value <= 2**32 - 1:
            raise GradcheckError(f"[tool.gradcheck] seed in {self.source} must be 0…{2**32 - 1}, got {value}")
        return value

    def path(self, key: str) -> Path | None:
        """A path key, relative to the config file's directory."""
        value = self.values.get(key)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() or self.source is None else self.source.parent / path


def load_config(explicit: Path | None = None, start: Path | None = None) -> Config:
    """``--config FILE``, else the first ``pyproject.toml`` with ``[tool.gradcheck]`` walking up from ``start``."""
    if explicit is not None:
        if not explicit.is_file():
            raise GradcheckError(f"--config {explicit} not found")
        return _read(explicit, required=True)
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            config = _read(candidate, required=False)
            if config.values or config.source is not None:
                return config
    return Config()


def _read(path: Path, *, required: bool) -> Config:
    try:
        data = loads_toml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcheckError(f"cannot read {path}: {exc}") from None
    except MalformedDocument as exc:
        raise GradcheckError(f"{path} is not valid TOML: {exc}") from None
    tools = data.get("tool", {})
    if not isinstance(tools, dict):
        raise GradcheckError(f"{path}: 'tool' must be a table ([tool.gradcheck])")
    # pyproject.toml keeps the keys under [tool.gradcheck]; a dedicated --config file may hold them at the top
    table = tools.get("gradcheck") if path.name == "pyproject.toml" else tools.get("gradcheck", data)
    if table is None:
        if required:
            raise GradcheckError(f"{path} has no [tool.gradcheck] table")
        return Config()
    if not isinstance(table, dict):
        raise GradcheckError(f"[tool.gradcheck] in {path} must be a table")
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("-", "_")
        if key not in KEYS:
            allowed = ", ".join(k.replace("_", "-") for k in KEYS)
            raise GradcheckError(f"unknown key {raw_key!r} in [tool.gradcheck] of {path}; allowed: {allowed}")
        if not isinstance(value, KEYS[key]) or (isinstance(value, bool) and bool not in KEYS[key]):
            raise GradcheckError(f"[tool.gradcheck] {raw_key} in {path} has the wrong type ({type(value).__name__})")
        values[key] = value
    return Config(values=values, source=path)
