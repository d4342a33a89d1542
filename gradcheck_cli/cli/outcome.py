"""Every outcome of a command turned into its documented exit code, in one place (DESIGN §2).

Typer would exit 1 on an uncaught exception, which reads as "the gate failed": here a domain error is
exit 2 with one line on stderr, a gradcheck bug exit 3 with its traceback and a request to report it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import NoReturn

import typer
from rich.console import Console

from gradcheck_cli.cli.options import Invocation, rank
from gradcheck_cli.errors import GradcheckError, ModelCodeError, OutOfMemory, first_line, is_out_of_memory
from gradcheck_cli.exitcodes import ExitCode

# Typer ≥ 0.24 vendors click as typer._click; older releases use click itself. Take the usage-error
# base class from Typer's own BadParameter so both work without importing click directly.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def run(app: typer.Typer, invocation: Invocation, err: Console) -> int:
    """``app()``, every exception turned into its exit code and its message on stderr."""
    try:
        return int(app(standalone_mode=False, obj=invocation) or 0)
    except GradcheckError as exc:
        return _refused(err, exc, invocation)
    except typer.Abort:
        err.print("aborted")
        return error_documents(invocation, ExitCode.UNUSABLE_INPUT, "aborted")
    except _ClickException as exc:
        exc.show()  # type: ignore[attr-defined]
        return error_documents(invocation, ExitCode.UNUSABLE_INPUT, _one_line(exc.format_message()))  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # app() returns its own exit codes (standalone_mode=False): this is the user's code
        message = (
            f"the model's code called sys.exit({exc.code!r}) while gradcheck ran it; a model that exits cannot be "
            "judged: remove the call"
        )
        return _refused(err, ModelCodeError(message), invocation)
    except Exception as exc:
        if is_out_of_memory(exc):
            message = (
                f"ran out of memory ({first_line(exc)}); try a smaller batch or a machine (or --device) with more "
                "memory"
            )
            return _refused(err, OutOfMemory(message), invocation)
        traceback.print_exc()
        err.print(
            "gradcheck hit an internal error (exit 3). Please report it with the command you ran and the "
            "traceback above at the project's issue tracker.",
            markup=False,
        )
        message = f"internal error (a gradcheck bug, please report it): {type(exc).__name__}: {first_line(exc)}"
        return error_documents(invocation, ExitCode.INTERNAL_ERROR, _one_line(message))
    except BaseException as exc:  # GeneratorExit or a custom BaseException from the model's code
        message = f"the model's code raised {type(exc).__name__}: {first_line(exc)}; gradcheck cannot judge it"
        return _refused(err, ModelCodeError(message), invocation)


def _refused(err: Console, exc: GradcheckError, invocation: Invocation) -> int:
    """The one-line error of exit code 2 (with ``--debug``, the traceback of its cause first)."""
    if invocation.debug:
        cause = exc.__cause__ or exc.__context__  # `raise ... from None` keeps the original as context
        traceback.print_exception(cause if cause is not None else exc)
    where = f" (rank {rank()})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    err.print(f"error{where}: {_one_line(str(exc))}", markup=False)
    return error_documents(invocation, ExitCode.UNUSABLE_INPUT, _one_line(str(exc)))


def error_documents(invocation: Invocation, code: int, message: str) -> int:
    """The error's document in each format the run was to deliver and has not yet (docs/ci.md): on standard
    output for a machine format (JSON, SARIF, JUnit, GitHub; text, Markdown and HTML keep the stderr line
    only), and in every ``--output`` file the run had checked, so none keeps an earlier run's report. Only
    rank 0 writes, as with reports. Returns ``code``."""
    if rank() != 0 or not invocation.destinations:
        return code
    from gradcheck_cli.outputs import write_text
    from gradcheck_cli.render.errors import MACHINE_FORMATS, render_error
    from gradcheck_cli.report.error import ErrorReport

    error = ErrorReport(code=code, message=message)
    for kind, destination in invocation.destinations:
        if destination in invocation.delivered:
            continue
        if destination is None:
            if kind in MACHINE_FORMATS:
                with contextlib.suppress(OSError):
                    sys.stdout.write(render_error(kind, error))
                    sys.stdout.flush()
            continue
        with contextlib.suppress(OSError, GradcheckError):  # the error line already said what went wrong
            write_text(destination, render_error(kind, error))
    return code


def _one_line(text: str) -> str:
    """Escape control characters (a newline inside a key name, say) so an error stays one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def exit_process(code: int, invocation: Invocation) -> NoReturn:
    """``sys.exit``; after a ``--distributed`` run, without the interpreter's teardown: gloo in torch 2.13 can
    abort a rank on the way out ("terminate called without an active exception") after all work is done,
    which would turn its exit code into a signal."""
    if invocation.distributed:
        with contextlib.suppress(OSError):  # a closed pipe must not turn the exit into a traceback
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
