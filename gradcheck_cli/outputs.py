"""Where gradcheck may write, and writing there without leaving half a file.

A report, plot, baseline or step summary never lands on one of the user's inputs: not on the same file
under another name (a hard link, a symbolic link, a relative path: compared by device and inode), and not
inside an input directory (a Hugging Face or DCP checkpoint, whose weights or ``.metadata`` a report would
replace). Every file is written to a temporary file beside it and renamed over the destination, so a
failure leaves the old file (or none), never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gradcheck_cli.errors import GradcheckError


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` names, following links; None when nothing is there."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


@dataclass(frozen=True)
class OutputGuard:
    """The run's inputs, and the check that an output is none of them and lies in none of them."""

    files: tuple[tuple[int, int], ...]
    directories: tuple[Path, ...]

    @classmethod
    def of(cls, inputs: Iterable[Path | None]) -> OutputGuard:
        """A guard over every input that exists (files by identity, directories by resolved path)."""
        files: list[tuple[int, int]] = []
        directories: list[Path] = []
        for path in inputs:
            if path is None:
                continue
            identity = _identity(path)
            if identity is None:
                continue
            files.append(identity)
            if path.is_dir():
                directories.append(path.resolve())
        return cls(tuple(files), tuple(directories))

    def check(self, output: Path, flag: str) -> None:
        """Refuse ``output`` (given with ``flag``) when it is an input or would be written inside one."""
        identity = _identity(output)
        if identity is not None and identity in self.files:
            raise GradcheckError(f"{flag} {output} is one of the input files; write it somewhere else")
        target = output.resolve()
        for directory in self.directories:
            if target == directory or directory in target.parents:
                raise GradcheckError(
                    f"{flag} {output} lies inside the input directory {directory}; write it somewhere else"
                )


def check_distinct(
    outputs: Iterable[Path],
    message: str = "two reports would be written to the same file; give each --output its own file",
) -> None:
    """Two outputs of one run must not name the same file (by resolved path or, when it exists, identity)."""
    seen: set[object] = set()
    for path in outputs:
        keys: set[tuple[str, object]] = {("path", str(path.resolve()))}
        identity = _identity(path)
        if identity is not None:
            keys.add(("inode", identity))
        if keys & seen:
            raise GradcheckError(message)
        seen |= keys


@contextlib.contextmanager
def replaced_atomically(path: Path, flag: str) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block succeeds."""
    directory = path.parent
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=directory)
    except OSError as exc:
        raise GradcheckError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, _mode_for(path))
        os.replace(temporary, path)
    except OSError as exc:
        raise GradcheckError(f"cannot write {flag} {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def _mode_for(path: Path) -> int:
    """An existing file's permissions, as an in-place write would keep them; else the umask's default."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text(path: Path, text: str, flag: str = "--output") -> None:
    """``path`` holds ``text`` (UTF-8), or what it held before when writing fails."""
    with replaced_atomically(path, flag) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_with(path: Path, draw: Callable[[Path], None], flag: str) -> None:
    """``draw(temporary)`` writes the file (a plot), which then replaces ``path`` in one rename."""
    with replaced_atomically(path, flag) as temporary:
        draw(temporary)
