"""Recommendations: the fixes that address each finding's likely cause, ranked, with evidence."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from gradcheck_cli.advise.trained import NOT_TRAINED, REINITIALISING, TrainedWeights, explain_trained
from gradcheck_cli.diagnose.module_kinds import PLAIN_RECURRENT
from gradcheck_cli.diagnose.rule_codes import (
    DEAD_UNITS,
    FP16_OVERFLOW,
    FP16_UNDERFLOW,
    NO_GRADIENT,
    UNSTABLE_OPTIMISATION,
)
from gradcheck_cli.diagnose.traits import ModelTraits
from gradcheck_cli.report.report import Finding, LayerStats, PathSummary, Problem, Recommendation
from gradcheck_cli.report.sections import ActivationLayer, Precision

DEEP_PLAIN_STACK = 20
"""Path length from which a plain stack without normalisation is called deep."""


def advise(
    findings: Sequence[Finding],
    layers: Sequence[LayerStats],
    path: PathSummary,
    traits: ModelTraits,
    *,
    activations: Sequence[ActivationLayer] = (),
    precision: Precision | None = None,
    half: bool = False,
    trained: TrainedWeights = NOT_TRAINED,
) -> tuple[Recommendation, ...]:
    """Ranked recommendations for the problems among ``findings``; empty when there are none.

    ``half``: the model trains in fp16 (fp16 parameters or ``--autocast fp16``); only then is loss
    scaling advised for GC013/GC014. ``trained`` (:func:`~gradcheck_cli.advise.trained.trained_weights`):
    a trained model gets no re-initialisation (clipping, the learning rate, normalisation and architecture
    instead), and the first recommendation says which weights look trained or what else says so.
    """
    problems = {f.problem for f in findings if f.problem is not None}
    recs: list[Recommendation] = []
    recs += _unstable_training(findings)
    recs += _dead_units(findings, trained)
    if Problem.NON_FINITE in problems:
        recs += _non_finite(findings, layers, traits)
    if Problem.EXPLODING in problems:
        recs += _exploding(findings, layers, path, traits)
    if Problem.VANISHING in problems:
        recs += _vanishing(findings, path, traits, _saturation_evidence(activations))
    if half:
        recs += _half_precision(findings, precision)  # how the model trains, not why its gradient fails: last
    if trained.whole:
        recs = _keep_trained(recs, trained, problems & {Problem.EXPLODING, Problem.VANISHING}, path, traits)
    unique: dict[str, Recommendation] = {}
    for rec in recs:
        unique.setdefault(rec.id, rec)
    return tuple(unique.values())


def _unstable_training(findings: Sequence[Finding]) -> list[Recommendation]:
    """GC015, gradients that blow up or collapse while training: a smaller step first."""
    unstable = next((f for f in findings if f.code == UNSTABLE_OPTIMISATION.code), None)
    if unstable is None or unstable.problem is None:
        return []
    lr = unstable.evidence.get("lr")
    smaller = f"{float(lr) / 10:g}" if isinstance(lr, (int, float)) else "lr / 10"
    return [
        Recommendation(
            "lower_lr",
            "Lower the learning rate",
            f"{unstable.message}",
            f"optimizer = torch.optim.{_optimizer_class(unstable)}(model.parameters(), lr={smaller})",
            (unstable.problem,),
        )
    ]


def _optimizer_class(finding: Finding) -> str:
    name = str(finding.evidence.get("optimizer", "sgd")).lower()
    return {"adam": "Adam", "adamw": "AdamW"}.get(name, "SGD")


def _dead_units(findings: Sequence[Finding], trained: TrainedWeights) -> list[Recommendation]:
    """Dead ReLUs (GC012): re-initialise, zeroing the biases that pushed them below 0; trained weights are kept:
    smaller steps then, and an activation that cannot die."""
    dead = next((f for f in findings if f.code == DEAD_UNITS.code), None)
    recs = []
    if dead is not None and trained.whole:
        recs.append(
            Recommendation(
                "lower_lr",
                "Lower the learning rate (and consider LeakyReLU/GELU when fine-tuning)",
                f"{dead.evidence.get('dead_share', math.nan):.0%} of the units of {dead.evidence.get('worst_layer')} "
                "never fire on this batch; large steps push ReLU units below zero for good, and the weights are "
                "trained, so re-initialising them would discard the training",
                "optimizer = torch.optim.AdamW(model.parameters(), lr=lr / 10)\n"
                "# fine-tuning anyway: nn.LeakyReLU(0.01) in place of nn.ReLU keeps the weights and cannot die",
                (Problem.VANISHING,),
                tuple(dead.evidence.get("layers", [])),
            )
        )
    elif dead is not None:
        recs.append(
            Recommendation(
                "kaiming_init",
                "Re-initialise the dead ReLU layers (Kaiming weights, zero biases)",
                f"{dead.evidence.get('dead_share', math.nan):.0%} of the units of {dead.evidence.get('worst_layer')} "
                "never fire on this batch; zero biases and Kaiming weights make about half of them fire again "
                "(LeakyReLU or GELU cannot die at all)",
                "for m in model.modules():\n    if isinstance(m, (nn.Linear, nn.Conv2d)):\n"
                '        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")\n        nn.init.zeros_(m.bias)',
                (Problem.VANISHING,),
                tuple(dead.evidence.get("layers", [])),
            )
        )
    return recs


def _half_precision(findings: Sequence[Finding], precision: Precision | None) -> list[Recommendation]:
    """fp16 under/overflow (GC013, GC014): a GradScaler at the measured scale, or bf16."""
    half = [f for f in findings if f.code in (FP16_UNDERFLOW.code, FP16_OVERFLOW.code)]
    recs = []
    if half and precision is not None:
        exponent = int(math.log2(precision.recommended_scale))
        why = "; ".join(f.message for f in half)
        recs.append(
            Recommendation(
                "mixed_precision_scaling",
                "Scale the loss in fp16 (GradScaler), or train in bf16",
                why,
                f"scaler = torch.amp.GradScaler(init_scale=2.0**{exponent})   # backs off by itself on overflow\n"
                "with torch.autocast(device_type, dtype=torch.float16):\n    loss = compute_loss(model, batch)\n"
                "scaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()\n"
                "# or: torch.autocast(device_type, dtype=torch.bfloat16) without a scaler",
                (),
                tuple(dict.fromkeys(layer for f in half for layer in f.evidence.get("layers", []))),
            )
        )
    return recs


def _saturation_evidence(activations: Sequence[ActivationLayer]) -> str:
    """`` σ'(z) measured RMS 0.24 over 49 Sigmoid layers`` for the activation_change evidence."""
    saturating = [a for a in activations if a.type in ("Sigmoid", "Tanh")]
    if not saturating:
        return ""
    rms = statistics.median(a.derivative_rms for a in saturating)
    kinds = "/".join(sorted({a.type for a in saturating}))
    return f"; measured φ'(z) has median RMS {rms:.3g} over {len(saturating)} {kinds} layers"


def _median_ratio(traits: ModelTraits, scheme: str) -> float | None:
    ratios = [s.std / getattr(s, scheme) for s in traits.init if getattr(s, scheme) > 0]
    return statistics.median(ratios) if ratios else None


def _vanishing(
    findings: Sequence[Finding], path: PathSummary, traits: ModelTraits, measured: str = ""
) -> list[Recommendation]:
    """A cut graph (GC005), vanishing through time (GC008), then the depth remedies: init, activation, norms."""
    recs = _cut_graph(findings)
    vanishing = [f for f in findings if f.problem is Problem.VANISHING and f.code != NO_GRADIENT.code]
    recs += _vanishing_through_time(vanishing)
    if all(f.evidence.get("recurrent") for f in vanishing):
        return recs  # a cut graph alone (GC005), or vanishing through time: no depth remedies
    gain = "n/a" if path.gain is None else f"{path.gain:.3g}"
    recs += _vanishing_init(traits, gain, measured)
    recs += _normalise_and_shortcut(path, traits, Problem.VANISHING)
    return recs


def _cut_graph(findings: Sequence[Finding]) -> list[Recommendation]:
    """Layers that ran but got no gradient (GC005): the graph is cut between them and the loss."""
    recs: list[Recommendation] = []
    blocked = next((f for f in findings if f.code == NO_GRADIENT.code), None)
    if blocked is not None:
        recs.append(
            Recommendation(
                "reconnect_graph",
                "Reconnect the layers that get no gradient",
                f"{len(blocked.evidence.get('layers', []))} layer(s) ran but got no gradient: {blocked.message}",
                "# look for .detach(), torch.no_grad(), .item(), .numpy() or integer casts between\n"
                f"# {blocked.layer} and the loss, and keep the tensor in the graph instead",
                (Problem.VANISHING,),
                tuple(blocked.evidence.get("layers", [])),
            )
        )
    return recs


def _vanishing_through_time(vanishing: Sequence[Finding]) -> list[Recommendation]:
    """Plain RNNs: gated cells and an orthogonal recurrent matrix; LSTM/GRU: an open forget gate."""
    recs: list[Recommendation] = []
    recurrent = {str(f.evidence["recurrent"]) for f in vanishing if f.evidence.get("recurrent")}
    through_time = next((f for f in vanishing if f.evidence.get("recurrent")), None)
    if through_time is not None:
        step_gain = through_time.evidence.get("gain")
        per_step = "n/a" if step_gain is None else f"{step_gain:.3g}"
        if recurrent & PLAIN_RECURRENT:
            recs.append(
                Recommendation(
                    "lstm_gru",
                    "Replace the plain RNN by an LSTM or GRU",
                    f"the gradient through time shrinks {per_step}× per step in {through_time.layer}; gated cells "
                    "keep an additive path through time",
                    "cell = nn.LSTMCell(input_size, hidden_size)   # or nn.LSTM / nn.GRU for whole sequences",
                    (Problem.VANISHING,),
                    (str(through_time.layer),),
                )
            )
            recs.append(
                _orthogonal_recurrent(
                    Problem.VANISHING,
                    "an orthogonal recurrent matrix has all singular values 1, so it neither shrinks nor grows the "
                    "gradient through time by itself",
                    str(through_time.layer),
                )
            )
        if recurrent - PLAIN_RECURRENT:
            recs.append(
                Recommendation(
                    "forget_gate_bias",
                    "Initialise the LSTM forget-gate bias to 1",
                    f"the gradient through time shrinks {per_step}× per step in {through_time.layer}; an open forget "
                    "gate (σ(1) ≈ 0.73 instead of σ(0) = 0.5) carries it further back from the start "
                    "(Jozefowicz et al. 2015); for GRUs, bias the update gate towards keeping the state",
                    "for name, p in lstm.named_parameters():\n    if name.startswith(('bias_ih', 'bias_hh')):\n"
                    "        h = p.shape[0] // 4   # gates i, f, g, o (GRU: // 3, gates r, z, n)\n"
                    "        p.data[h:2 * h] = 1.0 if name.startswith('bias_ih') else 0.0",
                    (Problem.VANISHING,),
                    (str(through_time.layer),),
                )
            )
    return recs


def _vanishing_init(traits: ModelTraits, gain: str, measured: str) -> list[Recommendation]:
    """Weights below the variance-preserving scale, or saturating activations: re-initialise or swap."""
    recs: list[Recommendation] = []
    xavier_ratio = _median_ratio(traits, "xavier")
    kaiming_ratio = _median_ratio(traits, "kaiming")
    if traits.relu_like and kaiming_ratio is not None and kaiming_ratio < 0.85:
        recs.append(
            Recommendation(
                "kaiming_init",
                "Initialise ReLU layers with Kaiming (He) init",
                f"weights sit at {kaiming_ratio:.2f}× the Kaiming scale √(2/fan_in) "
                f"({'the Xavier scale' if xavier_ratio and abs(math.log(xavier_ratio)) < 0.2 else 'too small'}); "
                f"ReLU halves the signal's variance, so each layer passes on about {kaiming_ratio:.2f}× "
                f"(measured gain {gain} per layer)",
                "for m in model.modules():\n    if isinstance(m, (nn.Linear, nn.Conv2d)):\n"
                '        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")\n        nn.init.zeros_(m.bias)',
                (Problem.VANISHING,),
            )
        )
    if traits.saturating:
        kinds = ", ".join(sorted(traits.saturating))
        recs.append(
            Recommendation(
                "activation_change",
                "Use a non-saturating activation (ReLU, GELU, SiLU)",
                f"{kinds}: sigmoid's derivative is at most 0.25, tanh's at most 1, and both are near 0 when the "
                f"unit saturates{measured}; "
                f"measured gain {gain} per layer",
                'nn.ReLU()   # or nn.GELU(); then re-initialise with nn.init.kaiming_normal_(w, nonlinearity="relu")',
                (Problem.VANISHING,),
            )
        )
        if xavier_ratio is not None and abs(math.log(xavier_ratio)) > 0.2:
            recs.append(
                Recommendation(
                    "xavier_init",
                    "Initialise sigmoid/tanh layers with Xavier (Glorot) init",
                    f"weights sit at {xavier_ratio:.2f}× the Xavier scale √(2/(fan_in+fan_out))",
                    "for m in model.modules():\n    if isinstance(m, (nn.Linear, nn.Conv2d)):\n"
                    '        # gain "tanh" before a Tanh\n'
                    '        nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("sigmoid"))\n'
                    "        nn.init.zeros_(m.bias)",
                    (Problem.VANISHING,),
                )
            )
    return recs


def _orthogonal_recurrent(problem: Problem, why: str, layer: str) -> Recommendation:
    return Recommendation(
        "orthogonal_init",
        "Initialise the recurrent weights orthogonally",
        why,
        "for name, p in rnn.named_parameters():\n    if name.startswith('weight_hh'):\n"
        "        gates = {'LSTM': 4, 'GRU': 3}.get(type(rnn).__name__.removesuffix('Cell'), 1)\n"
        "        for block in p.data.chunk(gates, 0):\n            nn.init.orthogonal_(block)",
        (problem,),
        (layer,),
    )


def _exploding(
    findings: Sequence[Finding], layers: Sequence[LayerStats], path: PathSummary, traits: ModelTraits
) -> list[Recommendation]:
    recs: list[Recommendation] = []
    grads = [layer.grad_norm for layer in layers if layer.grad_norm is not None and math.isfinite(layer.grad_norm)]
    total = math.sqrt(sum(g * g for g in grads)) if grads else math.nan
    outer = next((layer.grad_norm for layer in reversed(layers) if layer.grad_norm), None)
    suggested = outer * math.sqrt(len(grads)) if outer and grads else 1.0
    recs.append(
        Recommendation(
            "gradient_clipping",
            "Clip the gradient norm",
            f"the total gradient norm is {total:.3g}; if every layer carried as much as the output layer "
            f"({outer or math.nan:.3g}) it would be about {suggested:.2g}",
            f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={suggested:.2g})",
            (Problem.EXPLODING,),
        )
    )
    exploding = [f for f in findings if f.problem is Problem.EXPLODING]
    recurrent = {str(f.evidence["recurrent"]) for f in exploding if f.evidence.get("recurrent")}
    if recurrent:
        through_time = next(f for f in exploding if f.evidence.get("recurrent"))
        step_gain = through_time.evidence.get("gain")
        recs.append(
            _orthogonal_recurrent(
                Problem.EXPLODING,
                f"the gradient through time grows {step_gain or math.nan:.3g}× per step in {through_time.layer}: "
                "the recurrent matrix's spectral radius is above 1; an orthogonal one has all singular values 1",
                str(through_time.layer),
            )
        )
        if recurrent & PLAIN_RECURRENT:
            recs.append(
                Recommendation(
                    "lstm_gru",
                    "Replace the plain RNN by an LSTM or GRU",
                    "gated cells bound the state and keep an additive path through time",
                    "cell = nn.LSTMCell(input_size, hidden_size)   # or nn.LSTM / nn.GRU",
                    (Problem.EXPLODING,),
                )
            )
    xavier_ratio = _median_ratio(traits, "xavier")
    kaiming_ratio = _median_ratio(traits, "kaiming")
    scheme, ratio = ("kaiming", kaiming_ratio) if traits.relu_like else ("xavier", xavier_ratio)
    if ratio is not None and ratio > 1.05:
        rec_id = "kaiming_init" if scheme == "kaiming" else ("xavier_init" if traits.saturating else "orthogonal_init")
        snippet = {
            "kaiming_init": 'nn.init.kaiming_normal_(m.weight, nonlinearity="relu")\n        nn.init.zeros_(m.bias)',
            "xavier_init": "nn.init.xavier_normal_(m.weight)\n        nn.init.zeros_(m.bias)",
            "orthogonal_init": "nn.init.orthogonal_(m.weight)   # square layers; before a ReLU: gain=√2",
        }[rec_id]
        recs.append(
            Recommendation(
                rec_id,
                "Re-initialise the weights at the variance-preserving scale",
                f"weights sit at {ratio:.2f}× the {scheme.title()} scale; each layer multiplies the gradient by "
                f"about {path.gain or math.nan:.3g}",
                f"for m in model.modules():\n    if isinstance(m, (nn.Linear, nn.Conv2d)):\n        {snippet}",
                (Problem.EXPLODING,),
            )
        )
    recs += _normalise_and_shortcut(path, traits, Problem.EXPLODING)
    recs.append(
        Recommendation(
            "lower_lr",
            "Lower the learning rate",
            f"with gradients {path.attenuation or math.nan:.3g}× larger at the input end, a step size that suits "
            "the output layers overshoots the input layers",
            "optimizer = torch.optim.AdamW(model.parameters(), lr=lr / 10)",
            (Problem.EXPLODING,),
        )
    )
    return recs


def _keep_trained(
    recs: list[Recommendation], trained: TrainedWeights, problems: set[Problem], path: PathSummary, traits: ModelTraits
) -> list[Recommendation]:
    """Trained weights are kept: no re-initialisation of a trained model; normalisation and shortcuts stand in
    where nothing else addresses a problem."""
    kept = [rec for rec in recs if rec.id not in REINITIALISING]
    for problem in sorted(problems, key=lambda p: p.value):
        if not any(problem in rec.addresses for rec in kept):
            kept += _normalise_and_shortcut(path, traits, problem, deep=2)
    dropped = sorted({rec.id for rec in recs if rec.id in REINITIALISING})
    return explain_trained(kept, trained, dropped)


def _normalise_and_shortcut(
    path: PathSummary, traits: ModelTraits, problem: Problem, *, deep: int = DEEP_PLAIN_STACK
) -> list[Recommendation]:
    recs = []
    if not traits.norms:
        rec_id, title, snippet = (
            (
                "batch_norm",
                "Add batch normalisation after each linear/conv layer",
                "nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU())",
            )
            if not traits.recurrent
            else ("layer_norm", "Add layer normalisation", "nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU())")
        )
        recs.append(
            Recommendation(
                rec_id,
                title,
                "the model has no normalisation layer, so nothing resets the activation scale that the "
                f"gradient inherits (gain {path.gain or math.nan:.3g} per layer)",
                snippet,
                (problem,),
            )
        )
    if path.length >= deep and not traits.recurrent:
        recs.append(
            Recommendation(
                "residual",
                "Add shortcut (residual) connections",
                f"{path.length} layers in sequence; a shortcut x + f(x) gives the gradient an identity path, so it no "
                f"longer multiplies {path.length} per-layer factors of about {path.gain or math.nan:.3g}",
                "class Residual(nn.Module):\n"
                '    """x + f(LayerNorm(x)) around a block whose output has its input\'s shape."""\n'
                "    def __init__(self, f, d):\n        super().__init__()\n"
                "        self.norm, self.f = nn.LayerNorm(d), f\n"
                "    def forward(self, x):\n        return x + self.f(self.norm(x))",
                (problem,),
            )
        )
    return recs


def _non_finite(findings: Sequence[Finding], layers: Sequence[LayerStats], traits: ModelTraits) -> list[Recommendation]:
    bad_weights = [layer.name for layer in layers if not math.isfinite(layer.weight_norm)]
    recs = []
    if bad_weights:
        recs.append(
            Recommendation(
                "lower_lr",
                "Restore an earlier checkpoint and lower the learning rate",
                f"weights of {len(bad_weights)} layer(s) are already NaN/Inf (first: {bad_weights[0]}): an earlier "
                "update diverged",
                "# reload the last checkpoint whose weights are finite, then\n"
                "optimizer = torch.optim.AdamW(model.parameters(), lr=lr / 10)",
                (Problem.NON_FINITE,),
                tuple(bad_weights),
            )
        )
    recs.append(
        Recommendation(
            "gradient_clipping",
            "Clip the gradient norm and skip non-finite steps",
            "NaN/Inf reached the gradients; clipping keeps one bad batch from blowing up the weights",
            "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0, error_if_nonfinite=True)",
            (Problem.NON_FINITE,),
        )
    )
    if traits.half_precision:
        recs.append(
            Recommendation(
                "mixed_precision_scaling",
                "Use a gradient scaler or bf16",
                "the model holds fp16/bf16 parameters, where gradients overflow above 65504 and underflow below 6e-8",
                "scaler = torch.amp.GradScaler()\n"
                "scaler.scale(loss).backward()\nscaler.step(optimizer)\nscaler.update()",
                (Problem.NON_FINITE,),
            )
        )
    return recs
