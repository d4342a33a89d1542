"""The command line: the Typer app, its commands (one module each), and ``main()``, the console entry point.

The commands translate flags into the core's settings and call it; :mod:`gradcheck_cli.cli.outcome` turns
every outcome into its exit code. Nothing here imports torch, so ``gradcheck --help`` stays fast.
"""

from __future__ import annotations

import warnings
from typing import Annotated

import typer
from rich.console import Console

from gradcheck_cli.cli.history_cmd import history
from gradcheck_cli.cli.inspect_cmd import inspect
from gradcheck_cli.cli.options import Invocation, RecordingCommand
from gradcheck_cli.cli.outcome import exit_process, run
from gradcheck_cli.cli.simulate_cmd import simulate
from gradcheck_cli.exitcodes import ExitCode
from gradcheck_cli.version import __version__

EXIT_CODES_HELP = (
    "Exit codes: 0 healthy (nothing at or above --fail-on), 1 problems found, "
    "2 unusable input (bad flags, refused checkpoint, batch that does not fit), 3 internal error."
)

app = typer.Typer(
    name="gradcheck",
    help="Does the gradient flow through your PyTorch model? Where does it vanish or explode, why, "
    "and which fix works.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command(epilog=EXIT_CODES_HELP, cls=RecordingCommand)(inspect)
app.command(cls=RecordingCommand)(history)
app.command(epilog="Chain mode (--factor) imports no torch and answers instantly.", cls=RecordingCommand)(simulate)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradcheck {__version__}")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Root options."""


def main() -> None:
    """Console entry point: run the app and turn every outcome into a documented exit code.

    Warnings raised while it runs (torch's, NumPy's, the model's) are held back: shown after a run that
    finished, dropped before an exit-2 error, whose message stays one line.
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    invocation = Invocation()
    with warnings.catch_warnings(record=True) as held:
        code = run(app, invocation, err)
    if code in (ExitCode.OK, ExitCode.PROBLEMS, ExitCode.INTERNAL_ERROR):
        for warning in held:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    exit_process(code, invocation)
