"""Whether the weights are trained: the checkpoint's word (optimizer state, a step count) and the weights' own
statistics (:mod:`~gradcheck_cli.diagnose.weight_statistics`, through the init audit). Advice for a trained
model keeps its weights: it never re-initialises a model with a weight that looks trained (docs/calibration.md, "Trained
checkpoints").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

from torch import nn

from gradcheck_cli.diagnose.init_audit import audit_init
from gradcheck_cli.report.report import Recommendation
from gradcheck_cli.report.sections import InitAudit

REINITIALISING = frozenset({"kaiming_init", "xavier_init", "orthogonal_init", "forget_gate_bias", "activation_change"})
"""Recommendation ids whose fix overwrites weights or gate biases with freshly initialised values (the activation
swap re-initialises the layers feeding it)."""


@dataclass(frozen=True)
class TrainedWeights:
    """What says the weights are trained, and which of them."""

    reason: str | None
    """Why the model as a whole counts as trained (optimizer state in the checkpoint, or most weights no longer
    i.i.d.); None when it does not."""
    layers: tuple[str, ...] = ()
    """The weights (init audit names: ``fc1``, ``lstm.weight_hh_l0``) whose statistics say trained."""
    audited: int = 0
    """Weights the statistics were taken of."""

    @property
    def whole(self) -> bool:
        """The model comes from training: no weight may be re-initialised. One weight that looks trained is
        enough: the others of a trained model may have moved too little to tell (docs/calibration.md)."""
        return self.reason is not None

    def named(self, limit: int = 4) -> str:
        """``fc1, fc2 (2 of 5 weights)``: the trained weights, for messages."""
        shown = ", ".join(self.layers[:limit]) + (
            f" and {len(self.layers) - limit} more" if len(self.layers) > limit else ""
        )
        return f"{shown} ({len(self.layers)} of {self.audited} weights)"


NOT_TRAINED = TrainedWeights(None)


def trained_weights(model: nn.Module, audit: InitAudit | None, reason: str | None) -> TrainedWeights:
    """The trained state of ``model``'s weights: ``reason`` is the checkpoint's (``Provenance.trained``), ``audit``
    the init audit of this run (None where it did not run: then the weights' statistics are taken here, in
    definition order)."""
    if audit is None:
        audit = audit_init(model, ())
    found = TrainedWeights(None, audit.trained_layers, len(audit.layers))
    if reason is None and audit.skipped is not None and found.layers:
        reason = audit.skipped  # "weights look trained: 3 of 4 layers are no longer i.i.d. ..."
    elif reason is None and found.layers:  # a minority: the others moved too little to tell, or were frozen
        reason = f"{found.named()} no longer look like an initialisation"
    return dataclasses.replace(found, reason=reason)


def explain_trained(recs: list[Recommendation], trained: TrainedWeights, dropped: list[str]) -> list[Recommendation]:
    """Each recommendation says that it keeps the weights, and by what evidence they are trained (the list is
    reordered by the verification, so every one says it)."""
    left_out = f"; re-initialising ({', '.join(dropped)}) would discard the training and is left out" if dropped else ""
    clause = f"; keeps the weights, which are trained ({trained.reason}){left_out}"
    return [replace(rec, why=rec.why + clause) for rec in recs]
