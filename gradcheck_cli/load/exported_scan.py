"""``torch.export`` programs (``torch.export.save``, a ``.pt2`` zip archive).

``torch.export.load`` is not pickle-free. Reading its source (torch 2.13: ``torch/export/__init__.py``,
``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``) gives every place where
loading an archive can run code that the archive brings along:

1. a weight whose entry in ``data/weights/<model>_weights_config.json`` says ``use_pickle: true`` is read
   with ``torch.load(..., weights_only=False)``; so is a constant ``tensor_*`` with ``use_pickle``;
2. a constant ``opaque_obj_*`` is read with plain ``pickle.loads``, and a constant ``custom_obj_*`` is
   rebuilt as a TorchScript custom-class object (``torch._C._pickle_load_obj``);
3. the sample inputs ``data/sample_inputs/<model>.pt`` and the legacy ``data/weights/<model>.pt`` and
   ``data/constants/<model>.pt`` files are read tensors-only first, then with ``weights_only=False`` when
   that fails;
4. when the archive cannot be read as a PT2 archive (a ``RuntimeError``), ``torch.export.load`` falls back
   to the torch 2.7 layout (top-level ``version``, ``serialized_state_dict.pt``, ``serialized_constants.pt``,
   ``serialized_example_inputs.pt``, read the same way as 3.);
5. a symbolic shape's ``expr_str`` in the program's JSON is parsed with ``sympy.sympify``, which calls
   Python's ``eval`` on it;
6. files under ``data/aotinductor/`` are compiled code that ``load_pt2`` loads as a shared library;
7. the graph itself (``models/<model>.json``): running the program calls every node's ``target``, and a
   node can be ``torch.ops.aten.from_file.default(path, shared=True, size=n)`` followed by an in-place
   ``copy_``, which writes any file, or an operator of a library (``torch.ops.mylib.*``).

Every one of them is checked here, by reading the zip archive without executing anything, before
``torch.export.load`` is called. A pickle counts as safe only when torch's tensors-only unpickler reads
it (``torch.load(weights_only=True)``: that runs no code); in that case the ``weights_only=False`` load
that torch does afterwards rebuilds the same tensors. A graph node (in the program or in any subgraph of
``cond``/``while_loop``…), and any operator passed as an argument, must be an ``aten`` operator that
:mod:`~gradcheck_cli.load.op_policy` allows (tensors, numbers and option strings in, no file name, no
storage, no custom class), one of the control-flow operators of :data:`HIGHER_ORDER_OPS`, or one of the
symbolic-shape functions of :data:`SYMBOLIC_TARGETS`. Torch's deserializer builds a node only around an
operator, a higher-order operator or one of those functions (see :func:`target_problem`).

Names are matched the way torch's archive reader finds them: below any top-level folder, ignoring case.
"""

from __future__ import annotations

import functools
import io
import json
import math
import operator
import pickle
import pickletools
import posixpath
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.op_policy import operator_problem
from gradcheck_cli.load.safety import unsafe_globals

WEIGHTS_DIR = "data/weights/"
CONSTANTS_DIR = "data/constants/"
SAMPLE_INPUTS_DIR = "data/sample_inputs/"
AOTINDUCTOR_DIR = "data/aotinductor/"
MODELS_DIR = "models/"
ARCHIVE_VERSION = "archive_version"
SUPPORTED_ARCHIVE_VERSION = "0"
TENSOR_CONSTANT_PREFIX = "tensor_"
CUSTOM_OBJ_PREFIX = "custom_obj_"
OPAQUE_OBJ_PREFIX = "opaque_obj_"
LEGACY_ARTIFACTS = (
    "serialized_state_dict.pt",
    "serialized_state_dict.json",
    "serialized_constants.pt",
    "serialized_constants.json",
    "serialized_example_inputs.pt",
)
"""Top-level files of the torch 2.7 layout that ``torch.export.load`` may unpickle (with a fallback)."""
LEGACY_PROGRAM = "serialized_exported_program.json"

_TOKEN = re.compile(
    r"\s+|(?P<number>\d+\.?\d*(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_]\w*)|'(?P<quoted>[^'\\]*)'|\"(?P<dquoted>[^\"\\]*)\""
    r"|\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~^=]"
)
_SYMBOL = re.compile(r"[a-z]+\d+|(?:OpaqueUnaryFn|BitwiseFn)_[a-z0-9_]+")
"""Shape symbols as torch names them (``s0``, ``u3``, ``zuf0``...), and torch's generated sympy functions."""
_QUOTED = re.compile(r"[A-Za-z]\w*|[-+]?\d+\.?\d*(?:[eE][-+]?\d+)?")
"""What a quoted string may hold: a symbol's name (``Symbol('s0', ...)``) or a number (``Float('1.5', ...)``)."""
_SYMPY_NAMES = frozenset(
    {
        # torch.utils._sympy.functions, as the deserializer hands them to sympify
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
        "ToFloat", "Identity", "IntInfinity", "NegativeIntInfinity", "int_oo",
        # what srepr()/str() of a sympy expression over integers, floats and booleans prints
        "Symbol", "Integer", "Rational", "Float", "Half", "One", "Zero", "NegativeOne",
        "Add", "Mul", "Pow", "Max", "Min", "Abs", "floor", "ceiling", "sqrt", "exp", "log", "sign",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "LessThan",
        "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Xor", "ITE", "Piecewise", "ExprCondPair",
        "Tuple", "true", "false", "True", "False", "BooleanTrue", "BooleanFalse",
        "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "ComplexInfinity", "NaN", "pi", "E",
        # keyword arguments of Symbol(...) and Float(...)
        "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "infinite",
        "zero", "nonzero", "even", "odd", "rational", "commutative", "extended_real", "precision",
    }
)  # fmt: skip
"""Names a shape expression may use; anything else could reach Python builtins through ``eval``."""

HIGHER_ORDER_OPS = frozenset(
    {"cond", "while_loop", "map_impl", "scan", "associative_scan", "wrap_with_set_grad_enabled", "wrap_with_autocast"}
)
"""``torch.ops.higher_order.*`` that only run subgraphs of the same program (checked like the program)."""
SYMBOLIC_TARGETS = frozenset(
    {
        *(f"_operator.{name}" for name in (
            "eq", "ne", "le", "ge", "lt", "gt", "neg", "pos", "mul", "add", "sub", "floordiv", "mod", "pow",
            "truediv", "and_", "or_", "lshift", "rshift",
        )),
        "math.trunc", "torch.sym_not", "torch.sym_int", "torch.sym_float", "torch.sym_ite", "torch.sym_max",
        "torch.sym_min", "torch.sym_sqrt",
    }
)  # fmt: skip
"""The arithmetic on symbolic sizes torch's serializer writes by name (``_SYM_OPS`` in torch/_export/serde)."""
_OPERATOR_TARGET = re.compile(r"torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?")


# --------------------------------------------------------------------------- checking before loading


@dataclass(frozen=True)
class Finding:
    """One thing in an archive that loading it would import or run."""

    what: str
    """A phrase for the error line, e.g. ``io.open in pickled weight '0.weight' (m/data/weights/weight_0)``."""
    imports: tuple[str, ...] = ()
    """The globals a pickle names outside torch's tensors-only list, when they could be read."""


MAX_SHOWN = 3
"""How many findings an error line shows before it counts the rest."""


def describe(findings: list[Finding]) -> str:
    """The findings as one phrase: the first :data:`MAX_SHOWN`, and how many more."""
    shown = "; ".join(f.what for f in findings[:MAX_SHOWN])
    more = len(findings) - MAX_SHOWN
    return shown + (f"; and {more} more" if more > 0 else "")


@dataclass
class _Archive:
    """The members of a zip archive, found by name the way torch's archive reader finds them."""

    path: Path
    zip: zipfile.ZipFile
    by_relative: dict[str, list[zipfile.ZipInfo]] = field(default_factory=dict)
    """Lower-cased name below the archive's top-level folder → every member with that name."""
    top_level: dict[str, list[zipfile.ZipInfo]] = field(default_factory=dict)
    """Lower-cased name of members outside any folder (the torch 2.7 layout) → members."""

    @classmethod
    def open(cls, path: Path, handle: zipfile.ZipFile) -> _Archive:
        archive = cls(path, handle)
        for info in handle.infolist():
            if "/" in info.filename:
                relative = info.filename.split("/", 1)[1]
                archive.by_relative.setdefault(relative.lower(), []).append(info)
            else:
                archive.top_level.setdefault(info.filename.lower(), []).append(info)
        return archive

    def relative(self, name: str) -> list[zipfile.ZipInfo]:
        return self.by_relative.get(name.lower(), [])

    def relative_matching(self, prefix: str, suffix: str) -> list[tuple[str, zipfile.ZipInfo]]:
        """Members below the top folder whose name starts with ``prefix`` and ends with ``suffix``."""
        return [
            (name, info)
            for name, infos in self.by_relative.items()
            if name.startswith(prefix) and name.endswith(suffix)
            for info in infos
        ]

    def read(self, info: zipfile.ZipInfo) -> bytes:
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError) as exc:
            raise CheckpointError(
                f"{self.path} is a damaged .pt2 archive ({info.filename}: {first_line(exc)}); "
                "was it copied or written completely?"
            ) from None


def scan_archive(path: Path) -> list[Finding]:
    """What loading the archive at ``path`` would import or run; empty when nothing.

    Reads the zip archive only; nothing in it is unpickled beyond tensors or evaluated.
    """
    try:
        handle = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is a damaged .pt2 archive ({first_line(exc)}); was it copied or written completely?"
        ) from None
    with handle:
        archive = _Archive.open(path, handle)
        _check_version(archive)
        found = [
            *_compiled_code(archive),
            *_payload_configs(archive),
            *_fallback_pickles(archive),
            *_shape_expressions(archive),
            *_graph_operators(archive),
        ]
    return list(dict.fromkeys(found))


def _check_version(archive: _Archive) -> None:
    for info in archive.relative(ARCHIVE_VERSION):
        version = archive.read(info).decode("utf-8", "replace").strip()
        if version != SUPPORTED_ARCHIVE_VERSION:
            raise CheckpointError(
                f"{archive.path} is a .pt2 archive of version {version!r}, which torch {torch.__version__} "
                f"cannot read (it reads version {SUPPORTED_ARCHIVE_VERSION}); load it with the torch that wrote it"
            )


def _compiled_code(archive: _Archive) -> list[Finding]:
    compiled = [info.filename for _, info in archive.relative_matching(AOTINDUCTOR_DIR, "")]
    if not compiled:
        return []
    return [Finding(f"AOTInductor compiled code that torch loads as a shared library ({compiled[0]})")]


def _payload_configs(archive: _Archive) -> list[Finding]:
    """Weights and constants whose config entry makes torch unpickle (or rebuild) them."""
    found: list[Finding] = []
    for directory, suffix in ((WEIGHTS_DIR, "_weights_config.json"), (CONSTANTS_DIR, "_constants_config.json")):
        for _, info in archive.relative_matching(directory, suffix):
            config = _json(archive, info)
            entries = config.get("config") if isinstance(config, Mapping) else None
            if not isinstance(entries, Mapping):
                continue  # torch cannot read this config either: it fails before unpickling anything
            for fqn, meta in entries.items():
                if isinstance(meta, Mapping):
                    found += _payload_entry(archive, directory, str(fqn), meta)
    return found


def _payload_entry(archive: _Archive, directory: str, fqn: str, meta: Mapping[str, Any]) -> list[Finding]:
    path_name = meta.get("path_name")
    if not isinstance(path_name, str):
        return []
    member = posixpath.join(directory, path_name)
    if directory == CONSTANTS_DIR and path_name.startswith(OPAQUE_OBJ_PREFIX):
        names = tuple(
            dict.fromkeys(g for info in archive.relative(member) for g in _pickle_globals(archive.read(info)))
        )
        what = ", ".join(names) or "a pickled Python object"
        return [Finding(f"{what} in constant {fqn!r} ({member}, read with pickle.loads)", names)]
    if directory == CONSTANTS_DIR and path_name.startswith(CUSTOM_OBJ_PREFIX):
        return [Finding(f"a TorchScript custom-class object in constant {fqn!r} ({member})")]
    if directory == CONSTANTS_DIR and not path_name.startswith(TENSOR_CONSTANT_PREFIX):
        return []  # torch refuses an unknown constant kind before reading it
    if not meta.get("use_pickle"):
        return []
    kind = "weight" if directory == WEIGHTS_DIR else "constant"
    found = []
    for info in archive.relative(member):
        problem = _tensor_pickle_problem(archive.read(info))
        if problem is not None:
            found.append(Finding(f"{problem.what} in pickled {kind} {fqn!r} ({info.filename})", problem.imports))
    return found


def _fallback_pickles(archive: _Archive) -> list[Finding]:
    """Files torch reads tensors-only first and, when that fails, with ``weights_only=False``."""
    members = archive.relative_matching(SAMPLE_INPUTS_DIR, ".pt")
    members += archive.relative_matching(WEIGHTS_DIR, ".pt")  # legacy weights: data/weights/<model>.pt
    members += archive.relative_matching(CONSTANTS_DIR, ".pt")
    members += [(name, info) for name in LEGACY_ARTIFACTS for info in archive.top_level.get(name, [])]
    found = []
    for _, info in members:
        data = archive.read(info)
        problem = _tensor_pickle_problem(data) if data else None  # torch skips an empty sample-inputs file
        if problem is not None:
            found.append(Finding(f"{problem.what} in {info.filename}", problem.imports))
    return found


def _shape_expressions(archive: _Archive) -> list[Finding]:
    """Symbolic shapes whose text ``sympy.sympify`` would evaluate as arbitrary Python."""
    programs = [info for _, info in archive.relative_matching(MODELS_DIR, "")]
    programs += archive.top_level.get(LEGACY_PROGRAM, [])
    found = []
    for info in programs:
        for expression in _expressions(_json(archive, info)):
            if not is_plain_shape_expression(expression):
                shown = expression if len(expression) <= 60 else expression[:57] + "..."
                found.append(Finding(f"Python code in a shape expression of {info.filename} ({shown!r})"))
    return found


def _graph_operators(archive: _Archive) -> list[Finding]:
    """Graph nodes (and operator arguments) whose target is not a pure tensor operator."""
    programs = [info for _, info in archive.relative_matching(MODELS_DIR, "")]
    programs += archive.top_level.get(LEGACY_PROGRAM, [])
    found = []
    for info in programs:
        for node, target in _targets(_json(archive, info)):
            problem = target_problem(target)
            if problem is not None:
                shown = f"node {node!r}" if node else "an operator argument"
                found.append(Finding(f"{shown} of {info.filename} calls {target} ({problem})", (target,)))
    return found


def target_problem(target: str) -> str | None:
    """Why a serialized node target needs ``--trust``; None when it is allowed or can never run.

    ``torch.ops.<namespace>.<op>.<overload>`` and ``torch.ops.higher_order.<op>`` are judged by name. Any
    other spelling is resolved the way torch's deserializer resolves it (attribute by attribute from
    ``torch``, ``_operator`` or ``math``) and judged by what it names, so ``torch._ops.ops.aten.from_file.default``
    is refused like ``torch.ops.aten.from_file.default``; a target that names no operator (``torch.os.system``)
    is left to torch, which refuses to build a program around it before anything runs.
    """
    if target in SYMBOLIC_TARGETS:
        return None
    if target.startswith("#"):
        return "an operator of a serialization extension"
    match = _OPERATOR_TARGET.fullmatch(target)
    if match is not None:
        namespace, name, overload = match.groups()
        if namespace == "higher_order":
            return None if name in HIGHER_ORDER_OPS and overload is None else "not a control-flow operator"
        return operator_problem(f"{namespace}::{name}", overload) if overload else "an operator without an overload"
    return _resolved_problem(_resolve(target))


def _resolve(target: str) -> object | None:
    """What ``deserialize_operator`` in torch/_export/serde/serialize.py turns ``target`` into (None: a string)."""
    roots: dict[str, object] = {"_operator": operator, "torch": torch, "math": math}
    value = next((root for prefix, root in roots.items() if target.startswith(prefix)), None)
    for name in target.split(".")[1:] if value is not None else ():
        try:
            value = getattr(value, name)  # attribute lookups on torch's own modules, as torch does
        except Exception:
            return None
    return value


def _resolved_problem(value: object) -> str | None:
    if value is None or any(value is op for op in _symbolic_operators()):
        return None
    if isinstance(value, torch._ops.HigherOrderOperator):
        return None if value.name() in HIGHER_ORDER_OPS else "not a control-flow operator"
    if isinstance(value, torch._ops.OpOverload):
        return operator_problem(value._schema.name, value._overloadname)
    if isinstance(value, _extension_types()):
        return "an operator of a serialization extension"
    return None  # torch's deserializer refuses any other target: "Unsupported target type for node"


@functools.cache
def _symbolic_operators() -> tuple[object, ...]:
    return tuple(op for op in map(_resolve, sorted(SYMBOLIC_TARGETS)) if op is not None)


def _extension_types() -> tuple[type, ...]:
    """The node target types serialization extensions registered; every type when torch cannot say."""
    try:
        from torch._export.serde.serialize import _registered_extension_types

        return tuple(_registered_extension_types())
    except Exception:
        return (object,)


def _targets(value: Any) -> Iterator[tuple[str, str]]:
    """``(node name, target)`` of every node at any depth, and ``("", operator)`` of operator arguments."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            target = item.get("target")
            if "inputs" in item and target is not None:
                yield str(item.get("name") or ""), str(target)
            operator = item.get("as_operator")
            if operator is not None:
                yield "", str(operator)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _json(archive: _Archive, info: zipfile.ZipInfo) -> Any:
    """The member parsed as torch parses it (UTF-8 JSON); None when torch could not parse it either."""
    try:
        return json.loads(archive.read(info).decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _expressions(value: Any) -> Iterator[str]:
    """Every ``expr_str`` in a JSON document, at any depth."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, child in item.items():
                if key == "expr_str" and isinstance(child, str):
                    yield child
                else:
                    stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def is_plain_shape_expression(text: str) -> bool:
    """Whether ``text`` is arithmetic over shape symbols, numbers and sympy's shape functions only.

    Every name must be a shape symbol or one of :data:`_SYMPY_NAMES`, and a quoted string may hold
    only a symbol's name or a number: no attribute access, subscript, builtin or string to re-parse.
    """
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            return False
        name = match.group("name")
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL.fullmatch(name):
            return False
        quoted = match.group("quoted") if match.group("quoted") is not None else match.group("dquoted")
        if quoted is not None and not _QUOTED.fullmatch(quoted):
            return False
        position = match.end()
    return True


def _tensor_pickle_problem(data: bytes) -> Finding | None:
    """None when torch's tensors-only unpickler reads ``data``; else what a full unpickle would import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the tensors-only unpickler refused it, or it is not a torch file at all
        error = exc if isinstance(exc, pickle.UnpicklingError) else None
        names = tuple(dict.fromkeys(unsafe_globals(data, error) or _pickle_globals(data)))
        if names:
            return Finding(", ".join(names), names)
        return Finding(f"a pickle that is not tensors-only ({first_line(exc)})")
    return None


def _pickle_globals(data: bytes) -> list[str]:
    """The globals a pickle (or a ``torch.save`` zip's pickles) names outside torch's tensors-only list.

    Read with :mod:`pickletools`, which parses without executing; best effort (for the message only).
    """
    try:
        if data.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                blobs = [inner.read(n) for n in inner.namelist() if n.endswith(".pkl")]
        else:
            blobs = [data]
    except Exception:
        return []
    allowed = _allowed_globals()
    names: list[str] = []
    for blob in blobs:
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(blob):
                if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    names.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str) and ("UNICODE" in opcode.name or "STRING" in opcode.name):
                    strings.append(arg)
        except Exception:  # a damaged pickle: keep what was read before the damage
            pass
    return [n for n in dict.fromkeys(names) if n not in allowed]


def _allowed_globals() -> set[str]:
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # a torch without this private helper: name every global
        return set()
