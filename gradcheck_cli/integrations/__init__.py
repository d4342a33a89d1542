"""Callbacks that run :func:`gradcheck_cli.watch` inside a framework's own training loop.

* :mod:`gradcheck_cli.integrations.lightning`: ``GradcheckCallback`` for a Lightning ``Trainer``
  (``pip install gradcheck[lightning]``).
* :mod:`gradcheck_cli.integrations.huggingface`: ``GradcheckTrainerCallback`` for a Hugging Face
  ``Trainer`` (``pip install gradcheck[hf]``).

Both write the same JSON-lines history as ``watch(log=...)`` (``gradcheck history`` reads it), log a few
scalars to the logger the run already has, and apply the same ``on_problem`` policy: ``warn``,
``raise`` (:class:`~gradcheck_cli.training.monitor.GradientProblemError` out of the trainer) or ``stop``
(the trainer ends cleanly after the step). Neither framework is imported until its submodule is, and
importing this package imports neither (nor torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradcheck_cli.training.rules import Assessment

__all__ = ["scalars"]

PREFIX = "gradcheck/"


def scalars(assessment: Assessment) -> dict[str, float]:
    """The numbers of one record a logger plots: the total gradient norm, the per-layer gain, the
    attenuation (when the record has them) and the number of problems."""
    path = assessment.diagnosis.path
    out = {f"{PREFIX}total_norm": float(assessment.total_norm)}
    if path.gain is not None:
        out[f"{PREFIX}gain"] = float(path.gain)
    if path.attenuation is not None:
        out[f"{PREFIX}attenuation"] = float(path.attenuation)
    out[f"{PREFIX}problems"] = float(len(assessment.problems))
    return out
