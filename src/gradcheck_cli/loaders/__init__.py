"""Load any supported checkpoint into a module, recognised by content.

Nothing is unpickled beyond tensors unless the user passed ``--trust``; the user's files are only
ever opened for reading.
"""

from __future__ import annotations

from pathlib import Path

from gradcheck_cli.loaders.loaded import LoadedModel
from gradcheck_cli.loaders.sniff import Kind, sniff

__all__ = ["Kind", "LoadedModel", "load_checkpoint"]


def load_checkpoint(path: Path, *, model_spec: str | None, trust: bool) -> LoadedModel:
    """Load ``path`` (a file, a Hugging Face directory or a DCP directory) into a CPU module.

    Raises :class:`~gradcheck_cli.errors.GradcheckError` subclasses with one line saying what to do.
    """
    kind = sniff(path)
    if kind in (Kind.TORCH_ZIP, Kind.TORCH_LEGACY):
        from gradcheck_cli.loaders.torch_file import load_torch_file

        return load_torch_file(path, model_spec=model_spec, trust=trust)
    if kind is Kind.TORCHSCRIPT:
        from gradcheck_cli.loaders.torchscript import load_torchscript

        return load_torchscript(path)
    if kind is Kind.SAFETENSORS:
        from gradcheck_cli.loaders.safetensors_file import load_safetensors_file

        return load_safetensors_file(path, model_spec=model_spec)
    if kind is Kind.EXPORTED:
        from gradcheck_cli.loaders.exported import load_exported

        return load_exported(path, trust=trust)
    if kind is Kind.DCP:
        from gradcheck_cli.loaders.dcp import load_dcp_directory

        return load_dcp_directory(path, model_spec=model_spec, trust=trust)
    from gradcheck_cli.loaders.hf_dir import load_hf_directory

    return load_hf_directory(path, trust=trust)
