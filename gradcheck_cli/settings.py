"""What to probe and how (:class:`ProbeSettings`), and where the model and batch came from (:class:`Provenance`).

Both are frozen values that travel whole from the command line (or ``check()``'s keyword arguments) through
the pipeline to every pass that probes: the first probe, the float32 reference, the search for the first
NaN, the optimisation probe and each verified fix. The choices among fixed values (half precisions,
optimisers, ways to shard) are enums owned here, in the core; the command line offers exactly these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from gradcheck_cli.errors import GradcheckError

if TYPE_CHECKING:
    from gradcheck_cli.diagnose.rules import Thresholds


class Autocast(str, Enum):
    """Half precisions a probe can run under ``torch.autocast`` (fp16 with a GradScaler-style loss scale)."""

    fp16 = "fp16"
    bf16 = "bf16"


class Optimizer(str, Enum):
    """Optimisers of the optimisation probe (plain SGD: no momentum)."""

    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"

    @property
    def spelled(self) -> str:
        """The name as messages write it: SGD, Adam, AdamW."""
        return {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[self.value]


class Distributed(str, Enum):
    """How a model is wrapped across torchrun ranks: DDP, or FSDP2 per block."""

    ddp = "ddp"
    fsdp = "fsdp"


def _default_thresholds() -> Thresholds:
    """The calibrated defaults; the rules are imported only now, so the command line starts light."""
    from gradcheck_cli.diagnose.rules import Thresholds

    return Thresholds()


@dataclass(frozen=True)
class ProbeSettings:
    """What ``check()`` measures and how; the same for every pass of one run, so their numbers compare.

    A plain string for ``autocast`` or ``optimizer`` (``check(model, batch, autocast="fp16")``) is turned
    into its enum here, once; a string that names none is a :class:`GradcheckError`.
    """

    seed: int = 0
    """Seeds dropout, the random-projection loss and the initialisers the verified fixes run."""
    train: bool = True
    """Probe in train mode (where gradients matter); False probes in eval mode."""
    unfreeze: bool = False
    """Measure a model whose parameters are all frozen (otherwise refused: nothing would be trained)."""
    thresholds: Thresholds = field(default_factory=_default_thresholds)
    """Where the path attenuation stops being healthy."""
    verify: bool = True
    """Try each recommendation on a copy of the model and order them by the effect seen."""
    autocast: Autocast | None = None
    """Probe under ``torch.autocast`` in this half precision, beside a float32 reference."""
    steps: int = 0
    """Optimisation probe: this many optimiser steps on the batch, on a copy (0: none)."""
    lr: float = 1e-3
    """Optimisation probe: the learning rate."""
    optimizer: Optimizer = Optimizer.sgd
    """Optimisation probe: the optimiser."""
    loss_output: int | str | None = None
    """Which of the model's outputs the loss is computed from: an index into a tuple/list output or a key of a
    dict-like one (None: the model's own loss, else the first floating-point output with a target, else all)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "autocast", _autocast(self.autocast))
        object.__setattr__(self, "optimizer", _optimizer(self.optimizer))

    @property
    def autocast_name(self) -> str | None:
        """``autocast`` as the probe functions take it: ``"fp16"``, ``"bf16"`` or None."""
        return None if self.autocast is None else self.autocast.value

    def pass_options(self) -> dict[str, Any]:
        """What every forward+backward of this run shares (the probe's, a fix's re-probe, the NaN locator's):
        seed, mode, unfreezing and which output the loss uses, as the probe functions take them."""
        return {"seed": self.seed, "train": self.train, "unfreeze": self.unfreeze, "loss_output": self.loss_output}


@dataclass(frozen=True)
class Provenance:
    """Where the model and the batch came from: what the report's ``run`` section and notes say of them."""

    source: str = "python object"
    """The checkpoint's path, ``example:NAME``, or what a library caller passed."""
    checkpoint_kind: str = "module"
    """How the checkpoint was read (``state_dict``, ``torchscript``, ``example``...)."""
    batch_source: str = "passed to check()"
    """Where the batch came from (``--input FILE``, inferred from the model...)."""
    notes: tuple[str, ...] = ()
    """What the loader had to do, carried into the report's notes."""
    trained: str | None = None
    """Why the weights count as trained (the checkpoint held optimizer state): the init audit is skipped."""


class ProbeOptions(TypedDict, total=False):
    """:class:`ProbeSettings`'s fields as keyword arguments (``trace_optimisation(model, batch, steps=5)``)."""

    seed: int
    train: bool
    unfreeze: bool
    thresholds: Thresholds
    verify: bool
    autocast: Autocast | str | None
    steps: int
    lr: float
    optimizer: Optimizer | str
    loss_output: int | str | None


class CheckOptions(ProbeOptions, total=False):
    """``check()``'s keyword arguments: the fields of :class:`ProbeSettings` and of :class:`Provenance`."""

    source: str
    checkpoint_kind: str
    batch_source: str
    notes: tuple[str, ...]
    trained: str | None


def probe_settings(settings: ProbeSettings | None, options: Mapping[str, Any], function: str) -> ProbeSettings:
    """``settings`` (or the defaults) with ``options`` replacing its fields; any other keyword is a TypeError."""
    _refuse_unknown(options, _names(ProbeSettings), function)
    return _replaced(settings or ProbeSettings(), options)


def check_settings(
    settings: ProbeSettings | None, provenance: Provenance | None, options: Mapping[str, Any], function: str
) -> tuple[ProbeSettings, Provenance]:
    """``settings`` and ``provenance`` (or their defaults), each with its fields among ``options`` replaced."""
    _refuse_unknown(options, _names(ProbeSettings) | _names(Provenance), function)
    return _replaced(settings or ProbeSettings(), options), _replaced(provenance or Provenance(), options)


_Settings = TypeVar("_Settings", ProbeSettings, Provenance)


def _replaced(base: _Settings, options: Mapping[str, Any]) -> _Settings:
    names = _names(type(base))
    return dataclasses.replace(base, **{name: value for name, value in options.items() if name in names})


def _names(kind: type[ProbeSettings] | type[Provenance]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(kind))


def _refuse_unknown(options: Mapping[str, Any], known: frozenset[str], function: str) -> None:
    unknown = sorted(set(options) - known)
    if unknown:  # the TypeError Python itself raises for a keyword a function does not take
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")


def _autocast(value: Autocast | str | None) -> Autocast | None:
    if value is None or isinstance(value, Autocast):
        return value
    try:
        return Autocast(value)
    except ValueError:
        raise GradcheckError(f"autocast {value!r} is not a half precision; use fp16 or bf16") from None


def _optimizer(value: Optimizer | str) -> Optimizer:
    if isinstance(value, Optimizer):
        return value
    try:
        return Optimizer(value.strip().lower() if isinstance(value, str) else value)
    except ValueError:
        choices = ", ".join(o.value for o in Optimizer)
        raise GradcheckError(f"--optimizer must be one of {choices}, got {value!r}") from None
