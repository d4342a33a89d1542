"""The fixes that re-initialise weights or swap activations: Kaiming, Xavier, orthogonal, ReLU for
sigmoid/tanh, and the gate bias of LSTM/GRU cells. Each gets the model's copy, mutates it in place and says
what it did, or raises :class:`NotApplicable`.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from gradcheck_cli.advise.fix_targets import (
    LINEAR,
    RECURRENT,
    NotApplicable,
    count,
    following_activations,
    weight_layers,
    zero_bias,
)
from gradcheck_cli.diagnose.module_kinds import SWAPPABLE
from gradcheck_cli.probe.modules import module_type


def _describe(counts: Counter[str]) -> str:
    return ", ".join(f"{name} for {n}" for name, n in counts.most_common())


def kaiming_init(model: nn.Module) -> str:
    """``kaiming_normal_`` (fan_in) on every Linear/Conv weight for the activation after it; zero biases."""
    layers = weight_layers(model)
    if not layers:
        raise NotApplicable("the model has no Linear or Conv layer to re-initialise")
    follows = following_activations(model)
    used: Counter[str] = Counter()
    with torch.no_grad():
        for _, layer in layers:
            name, slope = follows.get(id(layer), LINEAR)
            if name == "relu":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            elif name == "leaky_relu":
                nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity="leaky_relu")
                name = f"leaky_relu (slope {slope:g})"
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=name)  # type: ignore[arg-type]
            zero_bias(layer)
            used[name] += 1
    return (
        f"re-initialised {count(len(layers), 'Linear/Conv weight')} with nn.init.kaiming_normal_ (fan_in; "
        f"nonlinearity {_describe(used)}) and zeroed their biases"
    )


def xavier_init(model: nn.Module) -> str:
    """``xavier_normal_`` with ``calculate_gain`` of the activation after each layer; zero biases."""
    layers = weight_layers(model)
    if not layers:
        raise NotApplicable("the model has no Linear or Conv layer to re-initialise")
    follows = following_activations(model)
    used: Counter[str] = Counter()
    with torch.no_grad():
        for _, layer in layers:
            name, slope = follows.get(id(layer), LINEAR)
            gain = nn.init.calculate_gain(name, slope)  # type: ignore[arg-type]
            nn.init.xavier_normal_(layer.weight, gain=gain)
            zero_bias(layer)
            used[f"{name} (gain {gain:.3g})"] += 1
    return (
        f"re-initialised {count(len(layers), 'Linear/Conv weight')} with nn.init.xavier_normal_ "
        f"(gain = calculate_gain of the activation after each: {_describe(used)}) and zeroed their biases"
    )


def _gate_blocks(module: nn.Module) -> int:
    kind = module_type(module)
    if kind.startswith("LSTM"):
        return 4
    if kind.startswith("GRU"):
        return 3
    return 1


def orthogonal_init(model: nn.Module) -> str:
    """Orthogonal recurrent weights (each gate's block), or orthogonal square Linear weights without recurrence.

    A model with RNN/LSTM/GRU modules or cells gets ``nn.init.orthogonal_`` on every ``weight_hh*``
    matrix, one square block per gate. A model without them gets it on every square Linear weight,
    scaled by ``calculate_gain`` of the activation after the layer (1 for a deep linear net).
    Biases are left as they are.
    """
    recurrent = [(name, m) for name, m in model.named_modules() if isinstance(m, RECURRENT)]
    with torch.no_grad():
        if recurrent:
            matrices = 0
            for _, module in recurrent:
                blocks = _gate_blocks(module)
                for pname, p in module.named_parameters(recurse=False):
                    if not pname.startswith("weight_hh"):
                        continue
                    rows = p.shape[0] // blocks
                    for b in range(blocks):
                        nn.init.orthogonal_(p[b * rows : (b + 1) * rows])
                    matrices += 1
            if not matrices:
                raise NotApplicable("the recurrent modules have no weight_hh matrix to re-initialise")
            names = ", ".join(name or "(model)" for name, _ in recurrent)
            return (
                f"re-initialised {count(matrices, 'recurrent weight_hh matrix')} of {names} with "
                "nn.init.orthogonal_, one square block per gate (biases and input weights unchanged)"
            )
        square = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        square = [(n, m) for n, m in square if m.in_features == m.out_features]
        if not square:
            raise NotApplicable("the model has no recurrent module and no square Linear layer to make orthogonal")
        follows = following_activations(model)
        used: Counter[str] = Counter()
        for _, layer in square:
            name, slope = follows.get(id(layer), LINEAR)
            gain = nn.init.calculate_gain(name, slope)  # type: ignore[arg-type]
            nn.init.orthogonal_(layer.weight, gain=gain)
            used[f"gain {gain:.3g}"] += 1
    return (
        f"re-initialised {count(len(square), 'square Linear weight')} with nn.init.orthogonal_ "
        f"({_describe(used)}, the activation's calculate_gain; biases unchanged)"
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def activation_change(model: nn.Module) -> str:
    """Swap saturating activation modules for ``nn.ReLU`` and Kaiming-initialise the layers feeding them.

    A bare swap keeps the weights at the scale chosen for sigmoid/tanh, which is too small for
    ReLU (it halves the variance), so a deep stack would still vanish: the snippet says to
    re-initialise, and so does this fix.
    """
    follows = following_activations(model)
    feeding = [m for _, m in weight_layers(model) if follows.get(id(m), LINEAR)[0] in {"sigmoid", "tanh"}]
    swapped: Counter[str] = Counter()
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and module_type(module) in SWAPPABLE:
            _replace(model, name, nn.ReLU())
            swapped[module_type(module)] += 1
    if not swapped:
        inside = any(isinstance(m, RECURRENT) for m in model.modules())
        raise NotApplicable(
            "no sigmoid/tanh activation module to swap: "
            + (
                "the tanh/sigmoid inside RNN/LSTM/GRU modules is part of the cell"
                if inside
                else "the activations are called as functions in forward (torch.sigmoid, F.tanh)"
            )
        )
    with torch.no_grad():
        for layer in feeding:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            zero_bias(layer)
    kinds = ", ".join(f"{n} {kind}" for kind, n in swapped.most_common())
    return (
        f"replaced {kinds} module(s) by nn.ReLU and re-initialised the "
        f"{count(len(feeding), 'Linear/Conv layer')} feeding them with "
        'nn.init.kaiming_normal_(nonlinearity="relu"), biases zeroed (a bare swap keeps a scale made for '
        "sigmoid/tanh, too small for ReLU)"
    )


def forget_gate_bias(model: nn.Module) -> str:
    """LSTM forget gate (bias_ih block 1 of 4) to 1 and its bias_hh block to 0; GRU update gate likewise.

    For a GRU, ``h' = (1 - z)·n + z·h``: a positive update-gate bias (block 1 of 3) keeps the state,
    the GRU's analogue of an open forget gate (σ(1) ≈ 0.73 of the state kept instead of 0.5).
    """
    done: list[str] = []
    for name, module in model.named_modules():
        kind = module_type(module)
        if not isinstance(module, RECURRENT) or not kind.startswith(("LSTM", "GRU")):
            continue
        blocks = _gate_blocks(module)
        params = dict(module.named_parameters(recurse=False))
        biases = [k for k in params if k.startswith("bias_ih")]
        if not biases:
            continue
        with torch.no_grad():
            for key in biases:
                size = params[key].shape[0] // blocks
                params[key][size : 2 * size] = 1.0
                hh = params.get(key.replace("bias_ih", "bias_hh"))
                if hh is not None:
                    hh[size : 2 * size] = 0.0
        gate = "forget" if blocks == 4 else "update"
        done.append(f"{name or '(model)'} ({kind}, {gate} gate, {count(len(biases), 'layer')})")
    if not done:
        raise NotApplicable("the model has no LSTM/GRU module or cell with a bias to set")
    return (
        "set the gate bias that keeps the state to 1 (bias_ih block 2 of 4 for LSTM forget gates, 2 of 3 for GRU "
        "update gates) and the matching bias_hh block to 0 in " + "; ".join(done)
    )
