"""The memory budget that every loader checks a file's declared sizes against, and regular-file checks.

A checkpoint or batch declares how much memory it needs before any of it is read: the uncompressed
sizes of its zip records, a ``.npy`` header's shape, a tensor's shape, a Hugging Face config's layer
count. Loaders compare those declarations with a :class:`MemoryBudget` *before* allocating, so a small
hostile file cannot take the machine.

Two limits come from one number:

- ``max_bytes``: the most a file may declare in all (its tensors, records, the model a config describes).
  Default: half of this machine's memory (the smaller of physical RAM and a cgroup limit), because
  loading holds the file's tensors and the model they are copied into at the same time, so a file that
  declares more than half the machine cannot be probed anyway; 16 GiB when the memory cannot be read.
  ``--max-memory`` (or ``GRADCHECK_MAX_MEMORY``) sets it.
- ``expansion_bytes`` = ``max_bytes / 64``: how much more than a file actually stores it may declare
  (deflated zip records, a stride-0 tensor view, an architecture larger than its weights). Honest files
  store what they declare, so this is small; raising ``--max-memory`` raises it too.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gradcheck_cli.errors import GradcheckError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
FALLBACK_BYTES = 16 * GiB
"""The budget when the machine's memory cannot be read."""
EXPANSION_SHARE = 64
"""``expansion_bytes`` is ``max_bytes`` divided by this."""
MIN_BUDGET = 1 * MiB
ENV_VAR = "GRADCHECK_MAX_MEMORY"
FLAG = "--max-memory"

_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class MemoryBudget:
    """How many bytes a file may declare (``max_bytes``), and where that number came from (``origin``)."""

    max_bytes: int
    origin: str
    """``--max-memory 8.0 GiB``, ``GRADCHECK_MAX_MEMORY=8GiB`` or ``the default, half of this machine's 23.4 GiB``."""

    @property
    def expansion_bytes(self) -> int:
        """How much more than it stores a file may declare (deflated records, stride-0 views)."""
        return self.max_bytes // EXPANSION_SHARE

    def limit(self) -> str:
        """``the 12.0 GiB memory budget (the default, half of ...)``."""
        return f"the {format_bytes(self.max_bytes)} memory budget ({self.origin})"

    def expansion_limit(self) -> str:
        """``the 192.0 MiB a file may expand to beyond what it stores (1/64 of the 12.0 GiB memory budget)``."""
        return (
            f"the {format_bytes(self.expansion_bytes)} a file may declare beyond what it stores "
            f"(1/{EXPANSION_SHARE} of the {format_bytes(self.max_bytes)} memory budget)"
        )


def format_bytes(count: int | float) -> str:
    """``1.5 GiB``, ``807 bytes``."""
    if count < KiB:
        return f"{int(count)} bytes"
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / KiB:.1f} KiB"


def parse_size(text: str, *, what: str = FLAG) -> int:
    """``8GiB``, ``8G``, ``8GB``, ``512MiB``, ``1.5T`` or a number of bytes; units are binary (1G = 2^30).

    Raises :class:`GradcheckError` with one line naming ``what`` when ``text`` is not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise GradcheckError(f"{what} {text!r} is not a memory size; write it like 8GiB, 512MiB or 2T")
    number, unit = match.groups()
    value = int(float(number) * _UNITS[unit.lower()])
    if value < MIN_BUDGET:
        raise GradcheckError(f"{what} {text!r} is below {format_bytes(MIN_BUDGET)}; give at least 1MiB")
    return value


def machine_memory() -> int | None:
    """Bytes of memory this process can use: physical RAM, or a smaller cgroup limit; None when unknown."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    if physical <= 0:
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text.isdigit() and 0 < int(text) < physical:
            physical = int(text)
    return physical


def default_budget() -> MemoryBudget:
    """``GRADCHECK_MAX_MEMORY`` when set, else half of :func:`machine_memory`, else 16 GiB."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return MemoryBudget(parse_size(configured, what=ENV_VAR), f"{ENV_VAR}={configured.strip()}")
    memory = machine_memory()
    if memory is None:
        return MemoryBudget(FALLBACK_BYTES, "the default when the machine's memory cannot be read")
    return MemoryBudget(max(memory // 2, MIN_BUDGET), f"the default, half of this machine's {format_bytes(memory)}")


_chosen: MemoryBudget | None = None


def memory_budget() -> MemoryBudget:
    """The budget loaders use when they are not given one: :func:`set_memory_budget`'s, else the default."""
    return _chosen if _chosen is not None else default_budget()


def set_memory_budget(value: str | int | None) -> MemoryBudget:
    """Set the budget for this process from ``--max-memory`` (a size, a byte count, or None for the default).

    Returns the budget now in force; raises :class:`GradcheckError` for a malformed size.
    """
    global _chosen
    if value is None:
        _chosen = None
        return default_budget()
    count = parse_size(value) if isinstance(value, str) else int(value)
    if count < MIN_BUDGET:
        raise GradcheckError(f"{FLAG} {count} is below {format_bytes(MIN_BUDGET)}; give at least 1MiB")
    _chosen = MemoryBudget(count, f"{FLAG} {format_bytes(count)}")
    return _chosen


@contextmanager
def use_memory_budget(value: str | int | None) -> Iterator[MemoryBudget]:
    """:func:`set_memory_budget` for the duration of a ``with`` block (tests, the Python API)."""
    global _chosen
    saved = _chosen
    try:
        yield set_memory_budget(value)
    finally:
        _chosen = saved


# --------------------------------------------------------------------------- regular files

_FILE_TYPES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def file_type(mode: int) -> str:
    """``a named pipe (FIFO)``, ``a character device``, ... for a ``st_mode``."""
    return next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")


def require_regular_file(path: Path, error: type[GradcheckError], what: str) -> int:
    """``path``'s size in bytes, checked to be a regular file (symlinks followed) *without opening it*.

    Opening a FIFO blocks until a writer appears, and a device never ends; both are refused with one line.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(
            f"{what} {path} is {file_type(info.st_mode)}, not a regular file; gradcheck reads only files it can "
            "size before opening: save or copy the data to a file and pass that"
        )
    return info.st_size


def refuse_special_members(directory: Path, error: type[GradcheckError], names: Iterable[str] | None = None) -> None:
    """Refuse a directory whose files gradcheck would read (config, weights, shards) include a pipe or device.

    ``names``: the entries to check; by default every ``*.json``, ``*.safetensors``, ``*.bin``, ``*.distcp``
    and ``.metadata`` entry. A broken symlink is left for the loader to report as missing.
    """
    wanted = tuple(names) if names is not None else None
    try:
        entries = list(os.scandir(directory))
    except OSError as exc:
        raise error(f"cannot list {directory}: {exc.strerror or exc}") from None
    for entry in entries:
        if wanted is not None and entry.name not in wanted:
            continue
        if wanted is None and not (
            entry.name == ".metadata" or entry.name.endswith((".json", ".safetensors", ".bin", ".distcp"))
        ):
            continue
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue
        if not stat.S_ISREG(mode):
            raise error(
                f"{entry.path} in {directory} is {file_type(mode)}, not a regular file; gradcheck reads only files "
                "it can size before opening: replace it with the file itself"
            )
