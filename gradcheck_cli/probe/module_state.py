"""A model's own tensor state between calls (neither parameter nor buffer), kept across a probe's pass.

A streaming model remembers its last call in a plain tensor attribute (``self.state = h``: Silero VAD's
TorchScript, an RNN that carries its hidden state). After one forward and backward that attribute holds a
tensor whose graph backward has freed; the next pass that reads it — the optimisation probe's next step, a
verification, the NaN locator — raises "Trying to backward through the graph a second time". Every pass of
gradcheck starts from the state the model was given: :class:`SavedTensorAttributes` snapshots these attributes
(detached copies) and puts them back, as :class:`~gradcheck_cli.probe.measure.SavedBuffers` does for buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def tensor_attributes(
    model: nn.Module, modules: Sequence[nn.Module] | None = None
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every tensor attribute of the model's modules (``modules``: ``model.modules()``,
    where the caller has them) that is neither a parameter nor a buffer: an eager module's plain attributes, a
    TorchScript module's declared ``Tensor`` attributes."""
    found = []
    for module in model.modules() if modules is None else modules:
        if isinstance(module, torch.jit.ScriptModule):
            items = _script_attributes(module)
        else:
            items = [(n, v) for n, v in vars(module).items() if isinstance(v, torch.Tensor)]
        if items:
            owned = set(module._parameters.keys()) | set(module._buffers.keys())
            found += [(module, name, value) for name, value in items if name not in owned]
    return found


def _script_attributes(module: torch.jit.ScriptModule) -> list[tuple[str, torch.Tensor]]:
    """The ``Tensor`` attributes a TorchScript module declares (its own, not its submodules')."""
    try:
        iterators = getattr(torch._C, "_jit_debug_module_iterators")  # noqa: B009 (untyped in torch's stubs)
        named = iterators(module._c)["named_attributes"]
    except (AttributeError, KeyError, RuntimeError):  # not a compiled module after all, or an older torch
        return []
    return [(name, value) for name, value in named if isinstance(value, torch.Tensor)]


class SavedTensorAttributes:
    """The model's tensor attributes (:func:`tensor_attributes`) as they are now, to put back later. An attribute
    a pass left alone (the same tensor, not written in place) stays as it is, aliases included; one the pass
    replaced or wrote to gets a detached copy of its old value, so a tensor holding the pass's graph never
    reaches the next pass."""

    def __init__(self, model: nn.Module, modules: Sequence[nn.Module] | None = None) -> None:
        self._saved = [
            (module, name, value, value._version, value.detach().clone())
            for module, name, value in tensor_attributes(model, modules)
        ]

    def restore(self) -> None:
        """Every changed attribute back to its saved value (a fresh copy each time: the snapshot stays intact)."""
        for module, name, original, version, copy in self._saved:
            if getattr(module, name, None) is original and original._version == version:
                continue
            setattr(module, name, copy.clone())


@contextlib.contextmanager
def kept_tensor_attributes(model: nn.Module) -> Iterator[None]:
    """The model's tensor attributes as they were (:class:`SavedTensorAttributes`) when the block exits."""
    saved = SavedTensorAttributes(model)
    try:
        yield
    finally:
        saved.restore()
