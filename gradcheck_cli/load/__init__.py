"""Load any supported checkpoint into a module, recognised by content.

Nothing is unpickled beyond tensors unless the user passed ``--trust``; the user's files are only
ever opened for reading. Every size a checkpoint declares is checked against the memory budget
(:mod:`gradcheck_cli.load.limits`) before it is allocated.
"""

from __future__ import annotations

from pathlib import Path

from gradcheck_cli.errors import CheckpointError
from gradcheck_cli.load.limits import MemoryBudget, memory_budget, set_memory_budget, use_memory_budget
from gradcheck_cli.load.loaded import LoadedModel
from gradcheck_cli.load.sniff import Kind, sniff

__all__ = [
    "Kind",
    "LoadedModel",
    "MemoryBudget",
    "load_checkpoint",
    "memory_budget",
    "set_memory_budget",
    "use_memory_budget",
]


def load_checkpoint(
    path: Path, *, model_spec: str | None, trust: bool, budget: MemoryBudget | None = None, strict: bool = True
) -> LoadedModel:
    """Load ``path`` (a file, a Hugging Face directory or a DCP directory) into a CPU module.

    ``strict`` has ``load_state_dict``'s meaning for weights loaded into ``--model`` (torch and safetensors
    files); with ``strict=False`` the report lists what was ignored or left at its initial value.

    Every size the checkpoint declares is checked against ``budget`` (the process-wide
    :func:`memory_budget` by default) before it is allocated. Raises
    :class:`~gradcheck_cli.errors.GradcheckError` subclasses with one line saying what to do.
    """
    budget = budget if budget is not None else memory_budget()
    kind = sniff(path)
    if kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
        from gradcheck_cli.load.torch_file import load_torch_file

        return load_torch_file(path, model_spec=model_spec, trust=trust, budget=budget, strict=strict)
    if kind is Kind.SAFETENSORS:
        from gradcheck_cli.load.safetensors_file import load_safetensors_file

        return load_safetensors_file(path, model_spec=model_spec, budget=budget, strict=strict)
    if kind in (Kind.TORCHSCRIPT, Kind.EXPORTED):
        return _load_archive(path, kind, trust=trust, budget=budget)
    if kind is Kind.DCP:
        from gradcheck_cli.load.dcp import load_dcp_directory

        return load_dcp_directory(path, model_spec=model_spec, trust=trust)
    from gradcheck_cli.load.hf_dir import load_hf_directory

    return load_hf_directory(path, trust=trust, budget=budget)


def _load_archive(path: Path, kind: Kind, *, trust: bool, budget: MemoryBudget) -> LoadedModel:
    """TorchScript and ``.pt2`` archives: record sizes (and a ``.pt2``'s inner pickles) checked before torch
    reads them; the loaded parameters and stored example inputs checked after."""
    from gradcheck_cli.load.sizes import check_tensors, check_zip_archive

    exported = kind is Kind.EXPORTED
    check_zip_archive(path, what="checkpoint", error=CheckpointError, budget=budget, nested=exported)
    if exported:
        from gradcheck_cli.load.exported import load_exported

        loaded = load_exported(path, trust=trust)
    else:
        from gradcheck_cli.load.torchscript import load_torchscript

        loaded = load_torchscript(path, trust=trust)
    example = loaded.example_batch
    stored = (example.args, example.kwargs, example.target) if example is not None else ()
    check_tensors((loaded.module, stored), source=path, what="checkpoint", error=CheckpointError, budget=budget)
    return loaded
