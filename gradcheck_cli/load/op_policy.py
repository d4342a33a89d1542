"""Which operators a TorchScript module or a ``torch.export`` graph may call without ``--trust``.

An allow-list, decided from each operator's registered schema rather than from a list of bad names:

- an ``aten`` operator is allowed when every overload of it (or the one overload a ``.pt2`` node names)
  takes and returns only in-process values — tensors, numbers, booleans, dtypes, devices, layouts, memory
  formats, generators, lists/tuples/dicts/optionals of these — and every ``str`` argument is one of the
  option names torch's tensor operators use (``approximate``, ``reduce``, ``equation``, ``rounding_mode``…) or
  the operand of a string method (``self``, ``substr``, ``separator``…). So ``aten::from_file(str filename,
  bool? shared, …)`` and ``aten::save(t item, str filename)`` are refused, and so is any future operator
  whose schema names a file, a path, a library, a ``Storage``, an ``RRef``, a stream or a custom class;
- ``prim`` operators from a fixed list of pure ones (type queries, casts, tuple indexing, raising);
- nothing from any other namespace: ``torch.ops.mylib.*``, ``quantized``, ``c10d``, ``profiler``…

Operators torch itself writes files or prints with despite plain arguments are named in
:data:`_EFFECTFUL_ATEN` (``aten::_print``).
"""

from __future__ import annotations

import functools
import re

import torch

ALLOWED_VALUE_TYPES = frozenset(
    {
        "Tensor", "int", "float", "bool", "complex", "str", "NoneType", "number", "Scalar", "SymInt", "SymFloat",
        "SymBool", "ScalarType", "Layout", "Device", "MemoryFormat", "QScheme", "Generator", "Dimname", "Any",
        "AnyEnumType", "t", "t1", "t2", "tVal", "tKey", "Future", "Await",
        # containers
        "List", "Tuple", "Dict", "Optional", "Union",
    }
)  # fmt: skip
"""Type names an allowed operator's arguments and results may be built from (``str(schema_argument.type)``)."""

ALLOWED_STR_ARGUMENTS = frozenset(
    {
        # options of tensor operators
        "approximate", "reduce", "rounding_mode", "mode", "interpolation", "driver", "UPLO", "norm", "ord", "p",
        "side", "padding", "padding_side", "pad_mode", "equation", "indexing", "activation", "algorithm",
        "assert_msg", "message", "api_name", "device_type", "type",
        # operands of string, list and dict methods (str.split, str.format, dict.get…)
        "self", "a", "b", "s", "string", "substr", "separator", "fillchar", "chars", "old", "new", "el", "key",
        "l", "item", "dict", "idx", "t", "to_add", "values", "input", "inputs",
    }
)  # fmt: skip
"""Names a ``str`` argument of an allowed ``aten`` operator may have: options and string operands, never
a file name or a path (``filename``, ``path``, ``file``… are absent on purpose)."""

_EFFECTFUL_ATEN = frozenset({"_print"})
"""``aten`` operators with plain arguments whose effect reaches outside the tensors (writing to stdout)."""

ALLOWED_PRIM = frozenset(
    {
        "RaiseException", "NumToTensor", "TupleIndex", "TupleUnpack", "StringIndex", "Uninitialized",
        "unchecked_cast", "unchecked_unwrap_optional", "EnumName", "EnumValue", "abs", "data", "device", "dtype",
        "grad", "index", "itemsize", "layout", "max", "min", "name", "nbytes", "rangelist", "requires_grad",
        "tolist", "type", "id", "BroadcastSizes", "ChunkSizes", "ConstantChunk", "ModuleContainerIndex",
        "IfThenElse", "AutogradAdd", "AutogradZero", "AutogradAnyNonZero", "AutogradAllZero", "AutogradAllNonZero",
        "is_cpu", "is_cuda", "is_ipu", "is_maia", "is_meta", "is_mkldnn", "is_mps", "is_mtia", "is_nested",
        "is_quantized", "is_sparse", "is_sparse_csr", "is_vulkan", "is_xla", "is_xpu",
    }
)  # fmt: skip
"""``prim`` operators that only read or reshape values already in the program (no printing, no RPC,
no Python call, no profiling)."""

_TYPE_NAME = re.compile(r"[A-Za-z_][\w.]*")
UNKNOWN = f"not an operator torch {torch.__version__} knows"
"""The reason given for a name that has no schema (callers may treat it as "not an operator")."""


def operator_problem(qualified: str, overload: str | None = None) -> str | None:
    """None when ``namespace::name`` (one ``overload`` of it, or else every overload) is allowed.

    Otherwise why not, as a short phrase for the error line (``its schema takes filename: str``).
    """
    namespace, sep, name = qualified.partition("::")
    if not sep or not name:
        return "not an operator"
    if namespace == "prim":
        return None if name in ALLOWED_PRIM else "not a pure prim operator"
    if namespace != "aten":
        return f"a custom or library operator, namespace {namespace}"
    if name in _EFFECTFUL_ATEN:
        return "it writes outside the program"
    return _aten_problem(name, overload)


@functools.lru_cache(maxsize=4096)
def _aten_problem(name: str, overload: str | None) -> str | None:
    try:
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
    except Exception:  # a name torch cannot look up
        schemas = []
    if overload is not None:
        wanted = "" if overload == "default" else overload
        schemas = [s for s in schemas if s.overload_name == wanted]
    if not schemas:
        return UNKNOWN
    for schema in schemas:
        problem = schema_problem(schema)
        if problem is not None:
            return problem
    return None


def schema_problem(schema: torch._C.FunctionSchema) -> str | None:
    """None when ``schema`` takes and returns in-process values only; else what it would reach."""
    overload = f" (overload {schema.overload_name})" if schema.overload_name else ""
    for argument in schema.arguments:
        foreign = _foreign_type(str(argument.type))
        string = _is_string(str(argument.type)) and argument.name not in ALLOWED_STR_ARGUMENTS
        if foreign is not None or string:
            return f"its schema{overload} takes {argument.name}: {argument.type}"
    for result in schema.returns:
        foreign = _foreign_type(str(result.type))
        if foreign is not None:
            return f"its schema{overload} returns a {foreign}"
    return None


def _foreign_type(type_text: str) -> str | None:
    """The first type name in ``type_text`` outside :data:`ALLOWED_VALUE_TYPES` (``Storage``, a class…)."""
    for name in _TYPE_NAME.findall(type_text):
        if name not in ALLOWED_VALUE_TYPES:
            return name
    return None


def _is_string(type_text: str) -> bool:
    return "str" in _TYPE_NAME.findall(type_text)
