"""How big the model a Hugging Face ``config.json`` describes is, found before building it.

Building allocates every parameter and runs Python for every layer: ``n_layer: 20000`` beside a small
checkpoint takes half a minute and gigabytes before the weights are found not to fit. Here the
architecture is built on the meta device (no memory): in full when its layer and expert counts are
small, else at 4 and 8 of each and extrapolated linearly (a stack of identical blocks grows by a fixed
amount per block), which costs a few small meta builds whatever the config says. The estimate is then
compared with the budget and with the parameters the weights actually hold.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcheck_cli.errors import CheckpointError
from gradcheck_cli.load.limits import MemoryBudget, format_bytes
from gradcheck_cli.load.sizes import raise_hint

REPEAT_KEY = re.compile(
    r"^(n_layers?|num_layers|depth|\w*_layers|num_experts|num_local_experts|n_routed_experts|moe_num_experts)$"
)
"""Config keys that count repeated blocks (layers, experts): a model's size is linear in each."""
EXACT_UP_TO = 64
"""Repeat counts up to this are built in full on the meta device; larger ones are extrapolated."""
SMALL, LARGE = 4, 8
"""The counts built to extrapolate from."""
MAX_EXTRAPOLATED = 4
"""At most this many large counts are extrapolated together (2**4 small meta builds)."""
NO_ESTIMATE_ABOVE = 1024
"""When extrapolating fails, counts up to this are still built in full on the meta device; beyond, refused."""
RATIO = 2
"""Refuse an architecture with more than this many times the parameters its weights hold (and more bytes
than the expansion allowance beyond them): it cannot be what the weights were saved from."""


@dataclass(frozen=True)
class Estimate:
    """Parameters and bytes (parameters and buffers) of the architecture, and the repeat counts read."""

    parameters: int
    nbytes: int
    repeats: tuple[tuple[str, int], ...]

    def counts(self) -> str:
        """``n_layer 20000`` (the repeat counts, for the message); empty when there are none."""
        return ", ".join(f"{name} {value}" for name, value in self.repeats)


def check_architecture(
    path: Path,
    cls: type[nn.Module] | None,
    config: Any,
    transformers: Any,
    state: Mapping[str, torch.Tensor],
    budget: MemoryBudget,
) -> None:
    """Refuse, before building it, an architecture over ``budget`` or far larger than its weights (``state``)."""
    estimate = estimate_architecture(path, cls, config, transformers)
    if estimate is None:
        return  # the config does not build on meta: the real build reports why
    name = cls.__name__ if cls is not None else "the base model"
    where = f" ({estimate.counts()})" if estimate.repeats else ""
    stored = sum(t.numel() for t in state.values())
    described = (
        f"{path}/config.json describes {name} with about {count(estimate.parameters)} parameters{where}, "
        f"{format_bytes(estimate.nbytes)}"
    )
    if estimate.nbytes > budget.max_bytes:
        raise CheckpointError(
            f"{described}, over {budget.limit()} (its weights hold {count(stored)}); "
            f"fix config.json if it does not describe these weights, or {raise_hint()}"
        )
    per_parameter = estimate.nbytes / max(estimate.parameters, 1)
    excess = (estimate.parameters - stored) * per_parameter
    if estimate.parameters > RATIO * stored and excess > budget.expansion_bytes:
        raise CheckpointError(
            f"{described}, but its weights hold only {count(stored)} parameters: building it would allocate "
            f"{format_bytes(excess)} more than the checkpoint stores, beyond {budget.expansion_limit()}; "
            "config.json does not describe these weights: fix it"
        )


def count(value: float) -> str:
    """``1.4 G``, ``124.4 M``, ``290.3 K``, ``12``."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return str(int(value))


def estimate_architecture(path: Path, cls: type[nn.Module] | None, config: Any, transformers: Any) -> Estimate | None:
    """The architecture's size from meta builds; None when even a full meta build fails (a broken config)."""
    repeats = list(_repeat_counts(config, transformers))
    shown = tuple((".".join((*p, k)), n) for p, k, n in repeats)
    large = [(p, k, n) for p, k, n in repeats if n > EXACT_UP_TO]
    if large:
        extrapolated = _extrapolate(cls, config, transformers, large)
        if extrapolated is not None:
            return Estimate(extrapolated[0], extrapolated[1], shown)
        biggest = max(n for _, _, n in large)
        if biggest > NO_ESTIMATE_ABOVE:
            counts = ", ".join(f"{name} {n}" for name, n in shown if n > EXACT_UP_TO)
            raise CheckpointError(
                f"{path}/config.json declares {counts}, more than {NO_ESTIMATE_ABOVE} repeated blocks, and gradcheck "
                "could not size that architecture without building it; fix config.json if it is wrong"
            )
    measured = _meta_size(cls, config, transformers)
    return None if measured is None else Estimate(measured[0], measured[1], shown)


def _repeat_counts(
    config: Any, transformers: Any, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, int]]:
    """``(path to the sub-config, key, count)`` for every layer or expert count in ``config`` and its sub-configs."""
    for key, value in list(vars(config).items()):
        if isinstance(value, transformers.PretrainedConfig) and len(prefix) < 2:
            yield from _repeat_counts(value, transformers, (*prefix, key))
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0 and _is_repeat_count(key):
            yield prefix, key, value


def _is_repeat_count(key: str) -> bool:
    """``n_layer``, ``num_hidden_layers``, ``num_experts``...; not ``max_window_layers`` (a threshold)."""
    return bool(REPEAT_KEY.match(key)) and not key.startswith("max_")


def _extrapolate(
    cls: type[nn.Module] | None, config: Any, transformers: Any, large: list[tuple[tuple[str, ...], str, int]]
) -> tuple[int, int] | None:
    """Size at the real counts, extrapolated from builds at every combination of SMALL and LARGE counts.

    A model's size is multilinear in its repeat counts (layers × experts per layer), so the ``2**k`` corner
    builds determine it exactly for stacks of identical blocks. None when a build fails or ``k`` is too big.
    """
    if len(large) > MAX_EXTRAPOLATED:
        return None
    span = LARGE - SMALL
    parameters = nbytes = 0
    for corner in itertools.product((SMALL, LARGE), repeat=len(large)):
        measured = _meta_size(
            cls, _with_counts(config, {(p, k): c for (p, k, _), c in zip(large, corner, strict=True)}), transformers
        )
        if measured is None:
            return None
        weight = 1
        for (_, _, value), at in zip(large, corner, strict=True):
            weight *= (value - SMALL) if at == LARGE else (LARGE - value)
        parameters += measured[0] * weight
        nbytes += measured[1] * weight
    scale = span ** len(large)
    return parameters // scale, nbytes // scale


def _with_counts(config: Any, counts: Mapping[tuple[tuple[str, ...], str], int]) -> Any:
    """A copy of ``config`` with the given counts set."""
    changed = copy.deepcopy(config)
    for (path, key), value in counts.items():
        owner = changed
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, key, value)
    return changed


def _meta_size(cls: type[nn.Module] | None, config: Any, transformers: Any) -> tuple[int, int] | None:
    """Parameters and bytes of the model built on the meta device; None when it does not build."""
    try:
        with torch.device("meta"):
            model = (
                cls(config) if cls is not None else transformers.AutoModel.from_config(config, trust_remote_code=False)
            )
    except Exception:  # an inconsistent config: the real build reports it in its own words
        return None
    if not isinstance(model, nn.Module):
        return None
    parameters = sum(p.numel() for p in model.parameters())
    tensors = list(model.parameters()) + list(model.buffers())
    return parameters, sum(t.numel() * t.element_size() for t in tensors)
