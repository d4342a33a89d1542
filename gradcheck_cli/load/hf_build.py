"""Building a Hugging Face architecture from a config, with the installed transformers only.

Shared by ``save_pretrained`` directories (:mod:`~gradcheck_cli.load.hf_dir`) and checkpoints that hold their
config (:mod:`~gradcheck_cli.load.self_described`): transformers builds the class a config names, offline, and
never runs code shipped beside it (``auto_map``, remote code).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from gradcheck_cli.errors import CheckpointError, first_line


def import_transformers(path: Path) -> Any:
    """transformers, imported lazily and offline (an optional dependency)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ModuleNotFoundError as exc:
        if exc.name not in ("transformers", None):
            raise CheckpointError(f"transformers is installed but cannot be imported: {first_line(exc)}") from None
        raise CheckpointError(
            f"{path} is a Hugging Face model directory; reading it needs transformers: pip install transformers"
        ) from None
    except ImportError as exc:
        raise CheckpointError(f"transformers is installed but cannot be imported: {first_line(exc)}") from None
    return transformers


@contextmanager
def quiet(transformers: Any) -> Iterator[None]:
    """Silence transformers' warnings while we build (config validation chatter); errors still show."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def model_class_or_none(transformers: Any, name: str) -> type[nn.Module] | None:
    """``transformers.<name>`` when it is a model class, else None."""
    if not name.isidentifier() or name.startswith("_"):
        return None
    try:
        candidate = getattr(transformers, name)
    except AttributeError:
        return None
    except Exception as exc:  # the lazy module failed to import the model (a missing optional package)
        raise CheckpointError(f"transformers has {name} but cannot import it: {first_line(exc)}") from None
    if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
        return candidate
    return None


def model_class(path: Path, config: Any, transformers: Any) -> type[nn.Module] | None:
    """The class ``config.architectures[0]`` names; None for 'the base model' (``AutoModel``)."""
    architectures = getattr(config, "architectures", None) or []
    if isinstance(architectures, str):  # a hand-edited config.json: "architectures": "BertModel"
        architectures = [architectures]
    if not architectures:
        return None
    name = str(architectures[0])
    cls = model_class_or_none(transformers, name)
    if cls is None:
        version = getattr(transformers, "__version__", "?")
        raise CheckpointError(
            f"{path}/config.json names architecture {name!r}, which is not a model class of transformers {version}; "
            'upgrade transformers or correct "architectures" in config.json'
        )
    expected = getattr(cls, "config_class", None)
    if (
        isinstance(expected, type)
        and expected is not transformers.PretrainedConfig
        and not isinstance(config, expected)
    ):
        raise CheckpointError(
            f"{path}/config.json names architecture {name}, which takes a {expected.__name__}, but its model_type "
            f"{getattr(config, 'model_type', '?')!r} gives a {type(config).__name__}"
        )
    return cls


def build(path: Path, cls: type[nn.Module] | None, config: Any, transformers: Any) -> nn.Module:
    """The model, freshly initialised (its weights are replaced next); ``AutoModel`` without an architecture."""
    what = cls.__name__ if cls is not None else "the base model (AutoModel)"
    try:
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config, trust_remote_code=False)
    except Exception as exc:  # an inconsistent config fails inside the model's constructor
        raise CheckpointError(f"cannot build {what} from {path}/config.json: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{what} built from {path}/config.json is a {type(model).__name__}, not a torch module")
    return model
