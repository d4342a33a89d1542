"""In-memory fixes: each one changes a copy of the model the way a recommendation's snippet would.

Every fix takes the copy, mutates it in place and returns what it did in plain words, or raises
:class:`NotApplicable` with the reason. None of them is ever given the user's model:
:mod:`gradcheck_cli.advise.verify` deep-copies it first, seeds the random initialisers and re-probes.

Which activation "follows" a weight layer is read from the module structure, not traced: the
activation module that comes after it in definition order before the next weight layer; where
none does (an activation module reused by several layers, a functional ``torch.relu``), the
model's most common activation module; the last weight layer (the output head) gets ``linear``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar

import torch
from torch import nn

from gradcheck_cli.diagnose.module_kinds import RELU_LIKE, SATURATING, SIGMOID_LIKE, SWAPPABLE
from gradcheck_cli.diagnose.traits import NORMS
from gradcheck_cli.probe.modules import module_type


class NotApplicable(Exception):
    """The fix does not apply to this model; ``str(error)`` says why in plain words."""


WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
WeightLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
BLOCK_INNER = NORMS | {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"}
"""Modules between a Linear/Conv and its activation that the residual fix keeps inside the block."""

Nonlinearity = tuple[str, float]
LINEAR: Nonlinearity = ("linear", 0.0)
"""A name ``nn.init.calculate_gain`` knows, and the negative slope for ``leaky_relu``."""


def nonlinearity_of(module: nn.Module) -> Nonlinearity:
    """The ``nn.init`` nonlinearity that best describes an activation module."""
    kind = module_type(module)
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", float(module.negative_slope))
    if isinstance(module, nn.PReLU):
        return ("leaky_relu", float(module.weight.detach().float().mean()))
    if isinstance(module, nn.RReLU):
        return ("leaky_relu", (module.lower + module.upper) / 2)
    if kind == "SELU":
        return ("selu", 0.0)
    if kind in RELU_LIKE:
        return ("relu", 0.0)
    if kind in SIGMOID_LIKE:
        return ("sigmoid", 0.0)
    if kind in SATURATING:
        return ("tanh", 0.0)
    if HF_ACTIVATIONS.search(kind):
        return ("relu", 0.0)
    return ("linear", 0.0)


HF_ACTIVATIONS = re.compile(r"(GELU|SiLU|Swish|Mish|ReLU|QuickGELU)\w*Activation$|^(NewGELU|FastGELU|QuickGELU)")
"""Hugging Face's own activation classes (``GELUActivation``, ``NewGELUActivation``...): ReLU-like for init."""


def _is_activation(module: nn.Module) -> bool:
    kind = module_type(module)
    return kind in RELU_LIKE | SATURATING or bool(HF_ACTIVATIONS.search(kind))


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if next(m.children(), None) is None]


def _is_weight_layer(module: nn.Module) -> bool:
    if module_type(module) in NORMS:
        return False
    return next(module.parameters(recurse=False), None) is not None and not _is_activation(module)


def weight_layers(model: nn.Module) -> list[tuple[str, WeightLayer]]:
    """Linear and Conv1d/2d/3d layers with a materialised weight, in definition order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, WEIGHT_LAYERS)
        and not isinstance(m.weight, nn.parameter.UninitializedParameter)
        and not nn.utils.parametrize.is_parametrized(m, "weight")  # weight_norm/spectral_norm: computed weights
    ]


SEEN_IN_FORWARD: ContextVar[dict[str, str] | None] = ContextVar("gradcheck_seen_in_forward", default=None)
"""Layer name → the activation that followed it in the probe's forward pass (the init audit's), when known."""
AUDIT_NONLINEARITIES = {"relu": "relu", "leaky_relu": "leaky_relu", "sigmoid": "sigmoid", "tanh": "tanh",
                        "selu": "selu", "linear": "linear", "gelu": "relu", "silu": "relu", "mish": "relu",
                        "elu": "relu", "hardswish": "relu", "softplus": "relu"}  # fmt: skip


def following_activations(model: nn.Module) -> dict[int, Nonlinearity]:
    """For each Linear/Conv layer (by ``id``), the nonlinearity that follows it (see the module docstring).

    Where the probe's forward pass saw it (:data:`SEEN_IN_FORWARD`, set by the verification from the init
    audit), that wins over the definition order, which misses a shared activation module.
    """
    seen = SEEN_IN_FORWARD.get() or {}
    by_id = {id(m): AUDIT_NONLINEARITIES.get(seen.get(name, "").lower()) for name, m in model.named_modules()}
    found = _static_activations(model)
    for key, follows in found.items():
        name = by_id.get(key)
        if name is not None and name != follows[0] and not (name == "leaky_relu" and follows[0] == "leaky_relu"):
            found[key] = (name, 0.01 if name == "leaky_relu" else 0.0)
    return found


def _static_activations(model: nn.Module) -> dict[int, Nonlinearity]:
    leaves = _leaves(model)
    fallback: Nonlinearity = ("linear", 0.0)  # never another layer's activation: say only what is seen
    layers = [m for _, m in weight_layers(model)]
    last = layers[-1] if layers else None
    found: dict[int, Nonlinearity] = {}
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, WEIGHT_LAYERS):
            continue
        follows: Nonlinearity | None = None
        for after in leaves[index + 1 :]:
            if _is_activation(after):
                follows = nonlinearity_of(after)
                break
            if _is_weight_layer(after):
                break
        if follows is None:
            follows = ("linear", 0.0) if leaf is last else fallback
        found[id(leaf)] = follows
    return found


def _describe(counts: Counter[str]) -> str:
    return ", ".join(f"{name} for {n}" for name, n in counts.most_common())


def _count(n: int, what: str) -> str:
    if n == 1:
        return f"1 {what}"
    return f"{n} {what[:-1] + 'ces' if what.endswith('matrix') else what + 's'}"


def _zero_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        nn.init.zeros_(bias)
        return True
    return False


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
            _zero_bias(layer)
            used[name] += 1
    return (
        f"re-initialised {_count(len(layers), 'Linear/Conv weight')} with nn.init.kaiming_normal_ (fan_in; "
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
            _zero_bias(layer)
            used[f"{name} (gain {gain:.3g})"] += 1
    return (
        f"re-initialised {_count(len(layers), 'Linear/Conv weight')} with nn.init.xavier_normal_ "
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
                f"re-initialised {_count(matrices, 'recurrent weight_hh matrix')} of {names} with "
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
        f"re-initialised {_count(len(square), 'square Linear weight')} with nn.init.orthogonal_ "
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
            _zero_bias(layer)
    kinds = ", ".join(f"{n} {kind}" for kind, n in swapped.most_common())
    return (
        f"replaced {kinds} module(s) by nn.ReLU and re-initialised the "
        f"{_count(len(feeding), 'Linear/Conv layer')} feeding them with "
        'nn.init.kaiming_normal_(nonlinearity="relu"), biases zeroed (a bare swap keeps a scale made for '
        "sigmoid/tanh, too small for ReLU)"
    )


class BatchNormLastDim(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the last dimension, for Linear outputs of any rank (``(N, C)``, ``(N, L, C)``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 2:
            return super().forward(input)
        flat = super().forward(input.reshape(-1, input.shape[-1]))
        return flat.reshape(input.shape)


class Residual(nn.Module):
    """``x + f(norm(x))``: the pre-norm shortcut the ``residual`` fix puts around a shape-preserving block."""

    def __init__(self, norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(self.norm(x))


def _plain_sequentials(model: nn.Module) -> list[nn.Sequential]:
    """``nn.Sequential`` modules whose forward is Sequential's own (a subclass may do anything)."""
    return [m for m in model.modules() if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]


def _rebuild(seq: nn.Sequential, items: list[tuple[str | None, nn.Module]]) -> None:
    """Replace the contents of ``seq`` in place (its parent keeps the same object).

    Numbered children are renumbered; named ones keep their names, and a new module without a
    name gets one derived from the module before it.
    """
    numbered = all(key.isdigit() for key in seq._modules)
    seq._modules.clear()
    previous = "block"
    for index, (key, module) in enumerate(items):
        if numbered:
            key = str(index)
        elif key is None:
            key = f"{previous}_{type(module).__name__.lower()}"
        seq.add_module(key, module)
        previous = key


def _norm_for(layer: nn.Module, kind: str) -> tuple[nn.Module, str]:
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    if isinstance(layer, nn.Linear):
        n = layer.out_features
        norm: nn.Module = BatchNormLastDim(n) if kind == "batch_norm" else nn.LayerNorm(n)
        label = f"BatchNorm1d({n})" if kind == "batch_norm" else f"LayerNorm({n})"
    else:
        assert isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        c = layer.out_channels
        dims = len(layer.kernel_size)
        if kind == "batch_norm":
            norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](c)
            label = f"BatchNorm{dims}d({c})"
        else:
            norm = nn.GroupNorm(1, c)
            label = f"GroupNorm(1, {c}) (LayerNorm over channels and positions)"
    return norm.to(device=weight.device, dtype=weight.dtype), label


def _insert_norms(model: nn.Module, kind: str) -> str:
    sequentials = _plain_sequentials(model)
    if not sequentials:
        raise NotApplicable(
            "the model has no nn.Sequential, so there is no place to insert a normalisation layer without "
            "changing its forward code"
        )
    inserted: Counter[str] = Counter()
    for seq in sequentials:
        children = list(seq._modules.items())
        items: list[tuple[str | None, nn.Module]] = []
        for index, (key, child) in enumerate(children):
            assert child is not None
            items.append((key, child))
            nxt = children[index + 1][1] if index + 1 < len(children) else None
            if isinstance(child, WEIGHT_LAYERS) and nxt is not None and (_is_activation(nxt) or _is_weight(nxt)):
                norm, label = _norm_for(child, kind)
                items.append((None, norm))
                inserted[label.split("(")[0]] += 1
        if len(items) != len(children):
            _rebuild(seq, items)
    if not inserted:
        raise NotApplicable(
            "no Linear/Conv layer inside an nn.Sequential is directly followed by an activation module or another "
            "Linear/Conv layer, so there is no hidden layer to normalise"
        )
    what = ", ".join(f"{n} {label}" for label, n in inserted.most_common())
    return (
        f"inserted {what} after each hidden Linear/Conv layer of an nn.Sequential (one followed by an activation "
        "or directly by another Linear/Conv; the output layer is left alone)"
    )


def _is_weight(module: nn.Module | None) -> bool:
    return isinstance(module, WEIGHT_LAYERS)


def batch_norm(model: nn.Module) -> str:
    """BatchNorm after each hidden Linear/Conv of any ``nn.Sequential``: one an activation or another layer follows."""
    return _insert_norms(model, "batch_norm")


def layer_norm(model: nn.Module) -> str:
    """LayerNorm (GroupNorm(1, C) for convolutions) after each hidden Linear/Conv of any ``nn.Sequential``."""
    return _insert_norms(model, "layer_norm")


def _keeps_shape(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return layer.in_features == layer.out_features
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if layer.in_channels != layer.out_channels or any(s != 1 for s in layer.stride):
            return False
        if layer.padding == "same":
            return True
        if isinstance(layer.padding, str):
            return False
        return all(
            p * 2 == d * (k - 1) for p, d, k in zip(layer.padding, layer.dilation, layer.kernel_size, strict=True)
        )
    return False


def _input_norm(layer: WeightLayer) -> nn.Module:
    """LayerNorm over a Linear's input features, GroupNorm(1, C) over a convolution's input channels."""
    norm: nn.Module = (
        nn.LayerNorm(layer.in_features) if isinstance(layer, nn.Linear) else nn.GroupNorm(1, layer.in_channels)
    )
    return norm.to(device=layer.weight.device, dtype=layer.weight.dtype)


def residual(model: nn.Module) -> str:
    """Wrap each shape-preserving block of an ``nn.Sequential`` into a pre-norm residual ``x + f(LayerNorm(x))``.

    A block is a Linear/Conv whose output has its input's shape (in == out features; for convolutions
    stride 1 and same padding), with the norm/dropout and activation modules that directly follow it.
    The shortcut is the advice snippet's pre-norm form: a plain ``x + f(x)`` around the existing
    weights grows the gradient by about √(1 + gain²) per block (a 50-layer ReLU net with Xavier
    weights goes from vanishing to exploding, 1e7), while the norm keeps each branch at unit scale.
    """
    sequentials = _plain_sequentials(model)
    if not sequentials:
        raise NotApplicable(
            "the model has no nn.Sequential, so a shortcut cannot be added without changing its forward code"
        )
    wrapped = 0
    for seq in sequentials:
        children = [(k, m) for k, m in seq._modules.items() if m is not None]
        items: list[tuple[str | None, nn.Module]] = []
        before = wrapped
        index = 0
        while index < len(children):
            key, child = children[index]
            if not (isinstance(child, WEIGHT_LAYERS) and _keeps_shape(child)):
                items.append((key, child))
                index += 1
                continue
            end = index + 1
            while end < len(children) and module_type(children[end][1]) in BLOCK_INNER:
                end += 1
            if end < len(children) and _is_activation(children[end][1]):
                end += 1
            body = nn.Sequential(*(m for _, m in children[index:end]))
            items.append((key, Residual(_input_norm(child), body)))
            wrapped += 1
            index = end
        if wrapped > before:
            _rebuild(seq, items)
    if not wrapped:
        raise NotApplicable(
            "no Linear/Conv layer inside an nn.Sequential keeps its input's shape (in == out features; for "
            "convolutions stride 1 and same padding), so x + f(x) is not defined there"
        )
    return (
        f"wrapped {_count(wrapped, 'shape-preserving Linear/Conv block')} (with the norm/activation after each) of "
        "nn.Sequential into pre-norm residual blocks x + f(LayerNorm(x)) (GroupNorm(1, C) for convolutions); "
        "weights unchanged"
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
        done.append(f"{name or '(model)'} ({kind}, {gate} gate, {_count(len(biases), 'layer')})")
    if not done:
        raise NotApplicable("the model has no LSTM/GRU module or cell with a bias to set")
    return (
        "set the gate bias that keeps the state to 1 (bias_ih block 2 of 4 for LSTM forget gates, 2 of 3 for GRU "
        "update gates) and the matching bias_hh block to 0 in " + "; ".join(done)
    )


def clip_gradients(model: nn.Module, max_norm: float) -> tuple[float, float]:
    """``clip_grad_norm_`` on the gradients already in ``.grad``; (total norm before, after)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise NotApplicable("no parameter of the copy received a gradient to clip")
    before = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad.coalesce().values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    after = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))
    return before, after


FIXES: dict[str, Callable[[nn.Module], str]] = {
    "kaiming_init": kaiming_init,
    "xavier_init": xavier_init,
    "orthogonal_init": orthogonal_init,
    "activation_change": activation_change,
    "batch_norm": batch_norm,
    "layer_norm": layer_norm,
    "residual": residual,
    "forget_gate_bias": forget_gate_bias,
}
"""Recommendation id → the fix that changes the model in memory (``gradient_clipping`` is separate)."""

UNVERIFIABLE: dict[str, str] = {
    "lstm_gru": "replacing the cell changes the module's outputs and parameters, so the same probe cannot compare "
    "them; build the LSTM/GRU model and run gradcheck on it",
    "lower_lr": "the learning rate acts only across optimiser steps; see the optimisation probe (--steps N)",
    "weight_decay": "weight decay acts only across optimiser steps; see the optimisation probe (--steps N)",
    "reconnect_graph": "the cut is in the model's forward code (.detach(), no_grad, .item()), which cannot be "
    "rewritten in memory",
    "mixed_precision_scaling": "a GradScaler or bf16 changes the training step, not the model, so a copy has "
    "nothing to change; the precision section shows what fp16 loses with and without the recommended scale",
}
"""Recommendation id → why one pass cannot verify it."""
