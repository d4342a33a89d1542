"""Import one module of an installed package without running the package's ``__init__.py``.

The packages this benchmark uses pull torchaudio, torchvision or librosa in their top-level
``__init__``; their model classes need none of that. Importing the class's own module under a
bare parent package keeps the model code exactly as shipped while leaving those imports out.
"""

import importlib
import importlib.machinery
import sys
import types


def bare_package(name: str) -> types.ModuleType:
    """Register package NAME (and its parents) as empty packages pointing at their folders."""
    if name in sys.modules:
        return sys.modules[name]
    parent, _, leaf = name.rpartition(".")
    search = bare_package(parent).__path__ if parent else None
    spec = importlib.machinery.PathFinder.find_spec(leaf, search)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"package {name} is not installed (is the target dir on PYTHONPATH?)")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__spec__ = spec
    sys.modules[name] = module
    if parent:
        setattr(sys.modules[parent], leaf, module)
    return module


def stub(name: str, **attrs: object) -> types.ModuleType:
    """Stand-in for a module whose contents the model class never uses."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def import_bare(name: str) -> types.ModuleType:
    """Import module NAME with its parent packages left bare."""
    bare_package(name.rpartition(".")[0])
    return importlib.import_module(name)


def package_file(package: str, relative: str) -> str:
    """Path of a data file shipped inside an installed package."""
    return f"{bare_package(package).__path__[0]}/{relative}"
