"""What the code inside a TorchScript archive would do, read before ``torch.jit.load`` runs any of it.

A TorchScript archive (``torch.jit.save``) is a zip: ``<root>/code/__torch__/**/*.py`` holds the program as
TorchScript source (Python syntax), and ``<root>/data.pkl`` / ``constants.pkl`` (and ``*.debug_pkl``) are
pickles that torch's C++ unpickler reads. ``torch.jit.load`` compiles the classes and rebuilds the module
objects from ``data.pkl``, calling each class's ``__setstate__`` when it defines one: code from the file runs
while loading, and ``forward`` runs when probing. A ``__setstate__`` that calls
``torch.from_file(path, shared=True, size=n)`` and ``copy_`` into it writes any file.

So, before loading (:func:`scan_archive`):

- every source file is parsed with :mod:`ast`, and every name it reaches is checked against an allow-list:
  ``torch.<op>`` / ``ops.aten.<op>`` / ``ops.prim.<op>`` as :mod:`~gradcheck_cli.load.op_policy` allows
  them, classes and functions of the archive itself (``__torch__.*``, never ``__torch__.torch.classes.*``,
  which are C++ classes from a library), TorchScript's builtins (``int``, ``len``, ``getattr``…, not
  ``print``), and method or attribute names that are not a refused operator;
- a ``__setstate__`` may only assign values taken from its state (``self.w = state[0]``): no call at all;
- the pickles may name only the globals torch's TorchScript unpickler rebuilds tensors, lists and devices
  with, and classes of the archive (not custom C++ classes, not RPC references).

After loading, before anything else runs (:func:`loaded_problems`), the compiled graphs of every method
are checked with the same operator allow-list: what runs is what was checked, whatever the source said.
"""

from __future__ import annotations

import ast
import pickletools
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from gradcheck_cli.errors import CheckpointError, first_line
from gradcheck_cli.load.exported_scan import Finding
from gradcheck_cli.load.op_policy import ALLOWED_PRIM, UNKNOWN, operator_problem

CUSTOM_CLASSES = "__torch__.torch.classes"
"""TorchScript's name for C++ classes registered by libraries (``torch.classes``)."""

BUILTIN_NAMES = frozenset(
    {
        # TorchScript's builtin functions (torch/csrc/jit/frontend/ir_emitter.cpp), without print
        "tuple", "float", "complex", "int", "bool", "str", "getattr", "hasattr", "isinstance", "_to_tensor", "len",
        "hex", "oct", "round", "hash", "id", "min", "max", "abs", "all", "any", "divmod", "sum", "list", "dict",
        "ord", "chr", "bin", "pow", "range", "zip", "enumerate", "rangelist", "sorted",
        # special forms of the source importer (torch/csrc/jit/serialization/import_source.cpp)
        "annotate", "unchecked_cast", "uninitialized", "fork", "awaitable", "inf", "nan",
        # type names in annotations and class bases
        "Tensor", "List", "Dict", "Optional", "Tuple", "Union", "NoneType", "Any", "Final", "Future", "Await",
        "NamedTuple", "Enum", "Module", "Interface", "ModuleInterface", "Device", "Generator", "number",
        "Scalar", "ScalarType", "Layout", "MemoryFormat", "QScheme", "SymInt", "SymFloat", "SymBool",
    }
)  # fmt: skip
"""Names TorchScript source may use without defining them."""

_SCALAR_TYPES = (
    "Byte", "Char", "Short", "Int", "Long", "Half", "Float", "Double", "ComplexHalf", "ComplexFloat",
    "ComplexDouble", "Bool", "QInt8", "QUInt8", "QInt32", "BFloat16", "QUInt4x2", "QUInt2x4", "Bits1x8",
    "Bits2x4", "Bits4x2", "Bits8", "Bits16", "Float8_e5m2", "Float8_e4m3fn", "Float8_e5m2fnuz",
    "Float8_e4m3fnuz", "UInt16", "UInt32", "UInt64", "Float8_e8m0fnu", "Float4_e2m1fn_x2",
)  # fmt: skip
PICKLE_GLOBALS = frozenset(
    {
        "torch.jit._pickle.build_tensor_from_id", "torch.jit._pickle.restore_type_tag",
        "torch.jit._pickle.build_intlist", "torch.jit._pickle.build_tensorlist",
        "torch.jit._pickle.build_doublelist", "torch.jit._pickle.build_boollist",
        "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_qtensor", "torch._utils._rebuild_sparse_tensor",
        "torch._tensor._rebuild_from_type_v2", "torch.Tensor", "builtins.complex", "collections.OrderedDict",
        "torch.device", "__main__.TensorID", "__main__.IntList", "torch.per_tensor_affine",
        "torch.per_channel_affine", "torch.per_tensor_symmetric", "torch.per_channel_symmetric",
        "torch.per_channel_affine_float_qparams",
        *(f"torch.{name}Storage" for name in _SCALAR_TYPES),
    }
)  # fmt: skip
"""What torch's C++ unpickler rebuilds itself (torch/csrc/jit/serialization/unpickler.cpp), without RPC
references; ``__torch__.*`` classes of the archive are allowed besides."""

_GRAPH_PRIM = frozenset(
    {
        "Constant", "GetAttr", "SetAttr", "ListConstruct", "ListUnpack", "TupleConstruct", "TupleSlice",
        "DictConstruct", "If", "Loop", "CallMethod", "CreateObject", "Enter", "Exit", "isinstance", "fork",
        "Param", "Return",
    }
)  # fmt: skip
"""Structural nodes of a compiled graph; the ones that run code are checked through their types."""

# --------------------------------------------------------------------------- before loading


def scan_archive(path: Path) -> list[Finding]:
    """What loading and running the TorchScript archive at ``path`` would do beyond tensor operations.

    Reads the zip archive only: nothing in it is compiled, unpickled or run. Empty when nothing.
    """
    try:
        handle = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged zip archive ({first_line(exc)})") from None
    with handle:
        sources: list[tuple[str, bytes]] = []
        found: list[Finding] = []
        for info in handle.infolist():
            relative = info.filename.split("/", 1)[-1].lower()
            if relative.startswith("code/") and relative.endswith(".py"):
                sources.append((info.filename, _read(handle, info, path)))
            elif relative.endswith((".pkl", ".debug_pkl")):
                found += _pickle_findings(_read(handle, info, path), info.filename)
    found = [*_source_findings(sources), *found]
    return list(dict.fromkeys(found))


def _read(handle: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> bytes:
    """The member's bytes; a member that cannot be read is a damaged archive."""
    try:
        return handle.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path} is a damaged zip archive ({info.filename}: {first_line(exc)})") from None


def _pickle_findings(data: bytes, member: str) -> list[Finding]:
    """Globals (and type tags) of a TorchScript pickle outside what the C++ unpickler rebuilds itself."""
    found: list[Finding] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                name = arg.replace(" ", ".")
                if not _allowed_global(name):
                    found.append(Finding(f"names {name} in its pickle {member}", (name,)))
            elif opcode.name in ("STACK_GLOBAL", "INST", "OBJ"):
                found.append(
                    Finding(f"imports through {opcode.name} in its pickle {member}, which TorchScript never writes")
                )
            elif isinstance(arg, str) and CUSTOM_CLASSES in arg:
                found.append(Finding(f"rebuilds a custom C++ class in its pickle {member} ({arg[:80]})"))
    except Exception as exc:  # pickletools parses without executing; a damaged pickle stops it
        found.append(Finding(f"has a pickle gradcheck cannot read ({member}: {first_line(exc)})"))
    return found


def _allowed_global(name: str) -> bool:
    """Whether a pickle global is one :data:`PICKLE_GLOBALS` names, or a class of the archive's own code."""
    if name.startswith("__torch__."):
        return not name.startswith(CUSTOM_CLASSES)
    return name in PICKLE_GLOBALS


def _source_findings(sources: list[tuple[str, bytes]]) -> list[Finding]:
    """Everything the source files reach beyond the allow-list; a file that cannot be parsed is a finding."""
    modules: list[tuple[str, str, ast.Module]] = []
    found: list[Finding] = []
    for member, data in sources:
        qualifier = _qualifier(member)
        try:
            text = data.decode("utf-8")
            tree = ast.parse(text, filename=member)
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            found.append(Finding(f"has code gradcheck cannot read ({member}: {first_line(exc)})"))
            continue
        found += _text_findings(text, tree, qualifier)
        modules.append((member, qualifier, tree))
    for member, qualifier, tree in modules:
        try:
            found += _module_findings(tree, qualifier)
        except RecursionError:  # the checks recurse along the tree; torch's printer never nests this deep
            found.append(Finding(f"has code nested too deeply for gradcheck to read ({member})"))
    return found


def _qualifier(member: str) -> str:
    """``root/code/__torch__/a/b.py`` → ``__torch__.a.b``, the name TorchScript gives what it defines."""
    relative = member.split("/", 1)[-1]
    relative = relative[len("code/") :] if relative.lower().startswith("code/") else relative
    return relative.removesuffix(".py").replace("/", ".")


def _text_findings(text: str, tree: ast.Module, qualifier: str) -> list[Finding]:
    """What the raw text mentions that the parsed tree does not account for (a parser mismatch)."""
    found = []
    if CUSTOM_CLASSES.split(".", 1)[1] in text:
        found.append(Finding(f"uses a custom C++ class (torch.classes) in {qualifier}", ("torch.classes",)))
    defined = sum(isinstance(n, ast.FunctionDef) and n.name == "__setstate__" for n in ast.walk(tree))
    if text.count("__setstate__") != defined:
        found.append(Finding(f"mentions __setstate__ in {qualifier} outside a definition gradcheck reads"))
    return found


def _module_findings(tree: ast.Module, qualifier: str) -> list[Finding]:
    """Classes, functions and constants of one source file; any other top-level statement is a finding."""
    found: list[Finding] = []
    for statement in tree.body:
        if isinstance(statement, ast.ClassDef):
            owner = f"{qualifier}.{statement.name}"
            body = _Checker(f"class {owner}", {"__annotations__"})
            found += body.run([*statement.bases, *statement.keywords])
            for item in statement.body:
                if isinstance(item, ast.FunctionDef):
                    found += _function_findings(item, f"{item.name} of {owner}")
                elif isinstance(item, (ast.Assign, ast.AnnAssign, ast.Pass)) or _is_docstring(item):
                    found += body.run([item])
                else:
                    found.append(Finding(f"has code outside methods ({type(item).__name__}) in class {owner}"))
        elif isinstance(statement, ast.FunctionDef):
            found += _function_findings(statement, f"function {qualifier}.{statement.name}")
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)) or _is_docstring(statement):
            found += _Checker(f"module {qualifier}", set()).run([statement])
        else:
            found.append(Finding(f"has top-level code ({type(statement).__name__}) in {qualifier}"))
    return found


def _is_docstring(node: ast.stmt) -> bool:
    """Whether ``node`` is a bare string (a docstring), which runs nothing."""
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _function_findings(function: ast.FunctionDef, where: str) -> list[Finding]:
    """A method's or function's findings; ``__setstate__`` gets the narrower check of what it may do."""
    bound = {n.arg for n in ast.walk(function) if isinstance(n, ast.arg)}
    bound |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    bound |= {n.name for n in ast.walk(function) if isinstance(n, ast.FunctionDef) and n is not function}
    if function.args.vararg or function.args.kwarg or function.decorator_list:
        return [Finding(f"uses *args, **kwargs or a decorator in {where}, which TorchScript never writes")]
    if function.name == "__setstate__":
        return _setstate_findings(function, where)
    return _Checker(where, bound).run([function])


def _setstate_findings(function: ast.FunctionDef, where: str) -> list[Finding]:
    """A ``__setstate__`` may only copy values out of its state into attributes: it runs while loading."""
    parameters = [a.arg for a in function.args.args]
    if len(parameters) != 2 or function.args.kwonlyargs or function.args.posonlyargs:
        return [Finding(f"defines {where} with arguments other than (self, state)")]
    local = {parameters[1]}
    for statement in function.body:
        problem = _setstate_statement_problem(statement, parameters[0], local)
        if problem is not None:
            return [Finding(f"{problem} in {where}, which runs while loading", _calls(statement))]
    return []


def _setstate_statement_problem(statement: ast.stmt, self_name: str, local: set[str]) -> str | None:
    """None for ``self.x = <state value>``, ``a, b = <state value>``, ``return None``; else what it does."""
    if isinstance(statement, ast.Pass) or _is_docstring(statement):
        return None
    if isinstance(statement, ast.Return):
        value = statement.value
        return None if value is None or (isinstance(value, ast.Constant) and value.value is None) else "returns a value"
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and _state_value(statement.value, local):
        target = statement.targets[0]
        names = target.elts if isinstance(target, ast.Tuple) else [target]
        if all(isinstance(n, ast.Name) for n in names):
            local.update(n.id for n in names if isinstance(n, ast.Name))
            return None
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == self_name:
            return None
    calls = _calls(statement)
    return f"calls {calls[0]}" if calls else f"runs a {type(statement).__name__} statement"


def _state_value(node: ast.expr, local: set[str]) -> bool:
    """Whether ``node`` only reads the state: names bound from it, constant indexes, tuples, casts."""
    if isinstance(node, ast.Name):
        return node.id in local
    if isinstance(node, ast.Constant):
        return node.value is None or isinstance(node.value, (bool, int, float))
    if isinstance(node, ast.Subscript):
        index = node.slice
        return _state_value(node.value, local) and isinstance(index, ast.Constant) and isinstance(index.value, int)
    if isinstance(node, ast.Tuple):
        return all(_state_value(e, local) for e in node.elts)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("unchecked_cast", "annotate")
    ):
        return len(node.args) == 2 and not node.keywords and _state_value(node.args[1], local)
    return False


def _calls(node: ast.AST) -> tuple[str, ...]:
    """The names a statement calls, as written (``torch.from_file``), in source order."""
    calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return tuple(dict.fromkeys(_dotted(n.func) or ast.unparse(n.func) for n in calls))


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for an attribute chain rooted at a name; None when it starts at another expression."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


class _Checker(ast.NodeVisitor):
    """Checks every name an expression or function reaches against the allow-list."""

    def __init__(self, where: str, bound: set[str]) -> None:
        self.where, self.bound = where, bound
        self.found: list[Finding] = []

    def run(self, nodes: Iterable[ast.AST]) -> list[Finding]:
        """Check ``nodes``; every finding so far (this checker's findings accumulate)."""
        for node in nodes:
            self.visit(node)
        return self.found

    def _refuse(self, what: str, name: str) -> None:
        """Record a finding: ``what`` the code does, here, naming ``name``."""
        self.found.append(Finding(f"{what} in {self.where}", (name,)))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        """``torch.op``, ``ops.ns.op``, ``__torch__.X``, ``CONSTANTS.cN``, or an attribute of a value."""
        dotted = _dotted(node)
        if dotted is None:  # an attribute of a computed value: (x)[0].name
            self._member(node.attr)
            self.generic_visit(node)
            return
        root, *rest = dotted.split(".")
        if root in self.bound or root in BUILTIN_NAMES:
            if root not in self.bound:
                self._name(root)
            for name in rest:
                self._member(name)
        else:
            self._reference(root, rest, dotted)

    def visit_Name(self, node: ast.Name) -> None:
        """A name read here must be local or one of :data:`BUILTIN_NAMES`."""
        if isinstance(node.ctx, ast.Load) and node.id not in self.bound:
            self._name(node.id)

    def visit_Call(self, node: ast.Call) -> None:
        """``getattr(x, "name")`` reaches ``name`` like ``x.name`` does; a computed name is refused."""
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and node.func.id not in self.bound
        ):
            attribute = node.args[1] if len(node.args) > 1 else None
            if isinstance(attribute, ast.Constant) and isinstance(attribute.value, str):
                self._member(attribute.value)
            else:
                self._refuse(f"reads an attribute whose name is computed ({node.func.id})", node.func.id)
        self.generic_visit(node)

    def generic_visit(self, node: ast.AST) -> None:
        """Refuse Python syntax TorchScript's printer never writes (imports, lambdas…); visit the rest."""
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal, ast.Lambda, ast.AsyncFunctionDef)):
            self._refuse(f"uses Python's {type(node).__name__}, which TorchScript never writes", type(node).__name__)
            return
        super().generic_visit(node)

    def _name(self, name: str) -> None:
        """A global name: allowed when TorchScript defines it (``print`` is not allowed: it writes to stdout)."""
        if name not in BUILTIN_NAMES:
            verb = "calls" if name == "print" else "refers to"
            self._refuse(f"{verb} {name}", name)

    def _member(self, name: str) -> None:
        """A method or attribute of a value: refused when it is a refused operator (``x.set_(storage)``)."""
        problem = operator_problem(f"aten::{name}")
        if problem is not None and problem != UNKNOWN:
            self._refuse(f"calls the method {name} ({problem})", name)

    def _reference(self, root: str, rest: list[str], dotted: str) -> None:
        """A dotted name that does not start at a local: an operator, a class of the archive, a constant."""
        if root == "torch":
            names = rest[1:] if rest[:1] == ["autograd"] else rest
            self._operator(dotted, f"aten::{names[0]}" if len(names) == 1 else None)
        elif root == "ops":
            self._operator(dotted, f"{rest[0]}::{rest[1]}" if len(rest) == 2 else None)
        elif root == "__torch__":
            if dotted.startswith(CUSTOM_CLASSES):
                self._refuse(f"uses the custom C++ class {dotted}", dotted)
        elif root == "CONSTANTS":
            if len(rest) != 1:
                self._refuse(f"refers to {dotted}", dotted)
        else:
            self._refuse(f"refers to {dotted}", dotted)

    def _operator(self, dotted: str, qualified: str | None) -> None:
        """``qualified`` (``aten::linear``) as :func:`operator_problem` judges it; None: not an operator."""
        if qualified is None:
            self._refuse(f"refers to {dotted}, which is not an operator", dotted)
            return
        namespace, _, name = qualified.partition("::")
        problem = operator_problem(qualified) if namespace != "prim" or name not in ALLOWED_PRIM else None
        if problem is not None:
            self._refuse(f"calls {dotted} ({problem})", dotted)


# --------------------------------------------------------------------------- after loading


def loaded_problems(module: torch.jit.ScriptModule) -> list[Finding]:
    """Operators outside the allow-list in the compiled graph of any method of ``module`` or its submodules.

    Runs nothing: compiling and inlining a method's graph only reads it.
    """
    found: list[Finding] = []
    checked: set[str] = set()
    for submodule in module.modules():
        if not isinstance(submodule, torch.jit.ScriptModule):
            continue
        type_name = submodule._c._type().qualified_name()
        if type_name in checked:  # modules of one type share their compiled methods (a stack of layers)
            continue
        checked.add(type_name)
        try:
            graphs = [(name, submodule._c._get_method(name).inlined_graph) for name in submodule._c._method_names()]
            hooks = [*submodule._c._get_forward_pre_hooks(), *submodule._c._get_forward_hooks()]
            graphs += [(f"hook {hook.name}", hook.inlined_graph) for hook in hooks]
        except Exception as exc:  # a method torch cannot compile or inline: it cannot be checked either
            found.append(Finding(f"has methods gradcheck cannot inspect in {type_name} ({first_line(exc)})"))
            continue
        for name, graph in graphs:
            found += [Finding(f"{what} in {name} of {type_name}", (what,)) for what in _graph_problems(graph)]
    return list(dict.fromkeys(found))


def _graph_problems(graph: torch._C.Graph) -> Iterator[str]:
    """Each node outside the allow-list, or touching a custom class or an RPC reference, as a phrase."""
    for node in _nodes(graph.nodes()):
        kind = node.kind()
        namespace, _, name = kind.partition("::")
        types = [str(v.type()) for v in (*node.inputs(), *node.outputs())]
        foreign = next((t for t in types if CUSTOM_CLASSES in t or re.search(r"\bRRef\b", t)), None)
        if foreign is not None:
            yield f"runs {kind} on a {foreign}"
        elif namespace == "prim" and (name in _GRAPH_PRIM or name in ALLOWED_PRIM):
            continue
        else:
            problem = operator_problem(kind)
            if problem is not None:
                yield f"calls {kind} ({problem})"


def _nodes(nodes: Iterable[torch._C.Node]) -> Iterator[torch._C.Node]:
    """Every node, with the ones inside ``if``/``loop`` blocks and ``fork`` subgraphs."""
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _nodes(block.nodes())
        if "Subgraph" in node.attributeNames():  # fork's closure: its calls are not inlined with the method
            subgraph = node.g("Subgraph").copy()
            torch._C._jit_pass_inline(subgraph)
            yield from _nodes(subgraph.nodes())
