"""The command line: parse flags, call the core, print, and map outcomes to exit codes.

This is the only module that prints or exits. It imports torch lazily, inside the commands,
so ``gradcheck --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from gradcheck_cli.errors import GradcheckError, ModelCodeError, OutOfMemory, first_line, is_out_of_memory
from gradcheck_cli.exitcodes import ExitCode
from gradcheck_cli.outputs import OutputGuard, check_distinct, write_text, write_with
from gradcheck_cli.render.registry import ReportFormat, renderer
from gradcheck_cli.version import __version__

# Typer ≥ 0.24 vendors click as typer._click; older releases use click itself. Take the usage-error
# base class from Typer's own BadParameter so both work without importing click directly.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

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


class OutputFormat(str, Enum):
    """Report formats of ``simulate``."""

    text = "text"
    json = "json"


class Precision(str, Enum):
    """Half precisions ``--autocast`` can probe under."""

    fp16 = "fp16"
    bf16 = "bf16"


class OptimizerName(str, Enum):
    """Optimisers of the optimisation probe."""

    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Distributed(str, Enum):
    """How ``--distributed`` wraps the model."""

    ddp = "ddp"
    fsdp = "fsdp"


def _rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0"))


# Options that inspect and history share, declared once.
FormatsOption = Annotated[
    list[ReportFormat] | None,
    typer.Option(
        "--format", "-f", help="Report format (repeatable: each --format takes the --output at its position)."
    ),
]
OutputsOption = Annotated[
    list[Path] | None, typer.Option("--output", "-o", help="Write the report to this file (repeatable).")
]
FailOnOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-on",
        help="What fails the gate: error (default), warning, info, never, or problems: vanishing, exploding, "
        "non_finite (repeatable, comma-separated).",
    ),
]
ExitZeroOption = Annotated[bool, typer.Option("--exit-zero", help="Advisory run: exit 0 even when problems are found.")]
SelectOption = Annotated[list[str] | None, typer.Option("--select", help="Only these rule codes (GC001,...).")]
IgnoreOption = Annotated[list[str] | None, typer.Option("--ignore", help="Leave out these rule codes.")]
IgnoreLayerOption = Annotated[
    list[str] | None, typer.Option("--ignore-layer", help="Leave out findings about layers matching PATTERN.")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show the traceback behind an input error (exit 2).")]


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


@app.command(epilog=EXIT_CODES_HELP)
def inspect(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="Checkpoint, recognised by content: pickled nn.Module (needs --trust), state_dict or training "
            "dict (needs --model), TorchScript, torch.export .pt2, .safetensors (needs --model), or a Hugging "
            "Face save_pretrained directory."
        ),
    ] = None,
    example: Annotated[
        str | None,
        typer.Option("--example", help="Inspect a built-in model instead of a file; 'list' shows them."),
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="Sample batch: torch.save of a tensor, (inputs..., target) or a dict of keyword tensors, or "
            ".npy/.npz. Default: a .pt2 file's example inputs, else a batch inferred from the model.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Architecture for weights-only files: 'package.module:factory' or 'path/file.py:factory'.",
        ),
    ] = None,
    trust: Annotated[
        bool, typer.Option("--trust", help="Allow unpickling code from the checkpoint (only for files you trust).")
    ] = False,
    output_format: FormatsOption = None,
    output: OutputsOption = None,
    fail_on: FailOnOption = None,
    exit_zero: ExitZeroOption = False,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    ignore_layer: IgnoreLayerOption = None,
    baseline: Annotated[
        Path | None, typer.Option("--baseline", help="Fail only on what got worse than this stored report.")
    ] = None,
    write_baseline: Annotated[
        Path | None, typer.Option("--write-baseline", help="Store this run's report as a baseline.")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="With --baseline: allowed change per layer, in orders of magnitude (1).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Read settings from this file instead of pyproject.toml.")
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option("--input-shape", help="No batch file: a random batch of this shape, e.g. 8,3,32,32."),
    ] = None,
    input_dtype: Annotated[
        str | None, typer.Option("--input-dtype", help="dtype for --input-shape: float32 (default), int64, ...")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, max=2**32 - 1, help="Seed for dropout and the random-projection loss (0).")
    ] = None,
    eval_mode: Annotated[bool, typer.Option("--eval", help="Probe in eval mode (default: train mode).")] = False,
    unfreeze: Annotated[
        bool, typer.Option("--unfreeze", help="Measure a model whose parameters are all frozen (requires_grad=False).")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="Device to run on: cpu (default), cuda, cuda:N, auto (cuda when available).")
    ] = None,
    vanishing_below: Annotated[
        float | None,
        typer.Option(help="Flag vanishing when the input-end gradient is below this fraction of the output's (1e-3)."),
    ] = None,
    exploding_above: Annotated[
        float | None,
        typer.Option(help="Flag exploding when the input-end gradient is above this multiple of the output's (1e3)."),
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Do not try the recommendations on a copy of the model.")
    ] = False,
    autocast: Annotated[
        Precision | None, typer.Option(help="Probe under torch.autocast in fp16 (with loss scaling) or bf16.")
    ] = None,
    steps: Annotated[
        int, typer.Option(min=0, max=10_000, help="Optimisation probe: optimiser steps on the batch, on a copy (0).")
    ] = 0,
    lr: Annotated[float, typer.Option(help="Optimisation probe: learning rate (1e-3).")] = 1e-3,
    optimizer: Annotated[OptimizerName, typer.Option(help="Optimisation probe: the optimiser.")] = OptimizerName.sgd,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the gradient-flow chart to FILE.png or FILE.svg (needs [plot]).")
    ] = None,
    profile: Annotated[
        bool, typer.Option("--profile", help="Time each phase (import, load, probe, diagnose, render...).")
    ] = False,
    distributed: Annotated[
        Distributed | None,
        typer.Option(
            help="Under torchrun: split the batch over the ranks, wrap the model (DDP, or FSDP2 per block) and "
            "reduce every norm across ranks; rank 0 writes the report."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="--distributed: seconds a collective waits for the other ranks.")
    ] = 300.0,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Most memory a checkpoint or batch may declare before it is refused, e.g. 8GiB "
            "(default: $GRADCHECK_MAX_MEMORY, else half of this machine's memory).",
        ),
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Probe a model with one forward and backward pass and report per-layer gradient health."""
    from gradcheck_cli.gate.config import load_config
    from gradcheck_cli.gate.fail_on import parse_fail_on
    from gradcheck_cli.gate.policy import Policy

    if example == "list":
        _print_examples()
        raise typer.Exit(ExitCode.OK)
    if example is not None:  # checked on the flags alone: a configured model or input is for checkpoints
        given = [
            flag for flag, value in (("--input", batch), ("--model", model), ("--input-shape", input_shape)) if value
        ]
        if given:
            raise GradcheckError(f"--example brings its own model and batch; drop {', '.join(given)}")
    settings = load_config(config)
    configured_model = settings.model_note() if example is None and model is None else None  # issue 16
    if example is None:
        model = model if model is not None else settings.model_spec(trust=trust)
        if batch is None and input_shape is None:
            batch = settings.path("input")
    if baseline is None and write_baseline is None:  # writing a new baseline does not compare with the old one
        baseline = settings.path("baseline")
    formats = (
        output_format or [ReportFormat(f) for f in _valid_formats(settings.strings("format"))] or [ReportFormat.text]
    )
    gate = parse_fail_on(fail_on or settings.strings("fail_on"))
    policy = Policy.build(
        select or settings.strings("select"), ignore or settings.strings("ignore"),
        ignore_layer or settings.strings("ignore_layers"),
    )  # fmt: skip
    vanishing = vanishing_below if vanishing_below is not None else float(settings.get("vanishing_below", 1e-3))
    exploding = exploding_above if exploding_above is not None else float(settings.get("exploding_above", 1e3))
    if (checkpoint is None) == (example is None):
        raise GradcheckError(
            "give either a CHECKPOINT or --example NAME (try: gradcheck inspect --example deep-sigmoid)"
        )
    destinations = _destinations(formats, output or [])
    written = [d for d in destinations if d is not None] + [p for p in (write_baseline, plot) if p is not None]
    check_distinct(written)
    model_file = Path(model.rpartition(":")[0]) if model and model.rpartition(":")[0].endswith(".py") else None
    guard = OutputGuard.of((checkpoint, batch, baseline, model_file, settings.source))
    for path in written:
        guard.check(path, "--plot" if path == plot else "--write-baseline" if path == write_baseline else "--output")
    _check_step_summary(formats, guard)
    if not (0 < vanishing < 1 < exploding):
        raise GradcheckError("thresholds must satisfy 0 < --vanishing-below < 1 < --exploding-above")
    if input_shape is not None and batch is not None:
        raise GradcheckError("give either --input or --input-shape, not both")
    _check_plot_suffix(plot)
    if steps == 0 and (lr != 1e-3 or optimizer is not OptimizerName.sgd):
        raise GradcheckError("--lr and --optimizer set the optimisation probe; add --steps N to run it")
    if distributed is not None and (steps or autocast is not None or example is not None):
        given = [f for f, on in (("--steps", steps), ("--autocast", autocast), ("--example", example)) if on]
        raise GradcheckError(f"--distributed does not run with {', '.join(given)} yet; drop it")

    from gradcheck_cli.timing import phase, recording

    with _status("probing gradients…"), recording() as phases:
        if profile:
            phases["startup"] = _process_age()
        with phase("import"):
            from gradcheck_cli.diagnose.rules import Thresholds
            from gradcheck_cli.load.limits import set_memory_budget
            from gradcheck_cli.load.synthetic import parse_shape
            from gradcheck_cli.pipeline import InspectRequest, run_inspect

        set_memory_budget(max_memory if max_memory is not None else settings.get("max_memory"))  # None: the default
        report = run_inspect(
            InspectRequest(
                checkpoint=checkpoint,
                example=example,
                batch=batch,
                model_spec=model,
                trust=trust,
                seed=seed if seed is not None else settings.seed(),
                train=not (eval_mode or bool(settings.get("eval", False))),
                unfreeze=unfreeze,
                device=device or str(settings.get("device", "cpu")),
                input_shape=None if input_shape is None else parse_shape(input_shape),
                input_dtype=input_dtype,
                thresholds=Thresholds(vanishing=vanishing, exploding=exploding),
                verify=not no_verify,
                autocast=None if autocast is None else autocast.value,
                steps=steps,
                lr=lr,
                optimizer=optimizer.value,
                distributed=None if distributed is None else distributed.value,
                timeout=timeout,
            )
        )
    report = policy.apply(report)
    if configured_model is not None:  # issue 16: the report names the file that named the model code
        from dataclasses import replace as with_notes

        report = with_notes(report, notes=(*report.notes, configured_model))
    if baseline is not None:  # every rank compares (reading only), so all of them exit alike
        from gradcheck_cli.gate.baseline import DEFAULT_TOLERANCE, compare

        allowed = tolerance if tolerance is not None else float(settings.get("tolerance", DEFAULT_TOLERANCE))
        report = compare(report, baseline, allowed, policy.keeps, policy.layer_ignored)
    if distributed is not None and _rank() != 0:  # every rank built the same report: rank 0 writes it
        raise typer.Exit(ExitCode.PROBLEMS if gate.fails(report) and not exit_zero else ExitCode.OK)
    if write_baseline is not None:
        from gradcheck_cli.gate.baseline import write_baseline as store

        store(report, write_baseline)
    if profile:
        from dataclasses import replace

        report = replace(report, timing=dict(phases))
    with recording() as rendering, phase("render"):
        for kind, destination in zip(formats, destinations, strict=True):
            _emit(report, kind, destination)
        if plot is not None:
            _plot(report, plot)
    if profile:
        spent = {**phases, **rendering}
        total = sum(spent.values())
        split = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in spent.items())
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"profile: {split}; {total:.2f} s in all", markup=False
        )
    failed = gate.fails(report) and not exit_zero
    raise typer.Exit(ExitCode.PROBLEMS if failed else ExitCode.OK)


def _valid_formats(names: list[str]) -> list[str]:
    choices = {f.value for f in ReportFormat}
    for name in names:
        if name not in choices:
            raise GradcheckError(f"format {name!r} in [tool.gradcheck] is not one of: {', '.join(sorted(choices))}")
    return names


def _destinations(formats: list[ReportFormat], outputs: list[Path]) -> list[Path | None]:
    """Each format's --output, None for stdout; at most one format may go to stdout.

    An ``--output`` belongs to the ``--format`` written before it on the command line, so
    ``-f github -f sarif -o g.sarif`` sends SARIF to the file and the workflow commands to stdout.
    """
    if len(outputs) > len(formats):
        raise GradcheckError(f"{len(outputs)} --output for {len(formats)} --format; give one --format per --output")
    order = _format_output_order(sys.argv[1:])
    if order is not None and order.count("f") == len(formats) and order.count("o") == len(outputs):
        destinations: list[Path | None] = []
        remaining = list(outputs)
        for index, token in enumerate(order):
            if token == "f":
                follows = index + 1 < len(order) and order[index + 1] == "o"
                destinations.append(remaining.pop(0) if follows else None)
            elif index == 0 or order[index - 1] != "f":
                raise GradcheckError("each --output must follow the --format it is for")
    else:
        destinations = [*outputs, *[None] * (len(formats) - len(outputs))]
    if destinations.count(None) > 1:
        raise GradcheckError("only one --format can go to stdout; give the others an --output FILE")
    return destinations


def _format_output_order(argv: list[str]) -> list[str] | None:
    """The sequence of -f/--format ('f') and -o/--output ('o') flags as typed, or None when not parseable."""
    order = []
    for token in argv:
        name = token.split("=", 1)[0]
        if name in ("-f", "--format") or (token.startswith("-f") and not token.startswith("--") and len(token) > 2):
            order.append("f")
        elif name in ("-o", "--output") or (token.startswith("-o") and not token.startswith("--") and len(token) > 2):
            order.append("o")
    return order


@app.command()
def history(
    log: Annotated[Path, typer.Argument(help="The JSON-lines file written by watch(model, log=...) or a callback.")],
    output_format: FormatsOption = None,
    output: OutputsOption = None,
    fail_on: FailOnOption = None,
    exit_zero: ExitZeroOption = False,
    select: SelectOption = None,
    ignore: IgnoreOption = None,
    ignore_layer: IgnoreLayerOption = None,
    vanishing_below: Annotated[
        float,
        typer.Option(help="Flag vanishing when the input-end gradient is below this fraction of the output's."),
    ] = 1e-3,
    exploding_above: Annotated[
        float,
        typer.Option(help="Flag exploding when the input-end gradient is above this multiple of the output's."),
    ] = 1e3,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the per-step charts to FILE.png or FILE.svg (needs [plot]).")
    ] = None,
    debug: DebugOption = False,
) -> None:
    """Judge a training run's gradient history: the onset step of each problem, the layers, the trend, the fixes."""
    from gradcheck_cli.gate.fail_on import parse_fail_on
    from gradcheck_cli.gate.policy import Policy

    formats = output_format or [ReportFormat.text]
    gate = parse_fail_on(fail_on or [])
    policy = Policy.build(select or [], ignore or [], ignore_layer or [])
    if not (0 < vanishing_below < 1 < exploding_above):
        raise GradcheckError("thresholds must satisfy 0 < --vanishing-below < 1 < --exploding-above")
    destinations = _destinations(formats, output or [])
    written = [d for d in destinations if d is not None] + ([plot] if plot is not None else [])
    check_distinct(written)
    guard = OutputGuard.of((log,))
    for path in written:
        guard.check(path, "--plot" if path == plot else "--output")
    _check_step_summary(formats, guard)
    _check_plot_suffix(plot)
    with _status("reading the history…"):
        from gradcheck_cli.diagnose.rules import Thresholds
        from gradcheck_cli.training.history import history_report

        report = history_report(log, Thresholds(vanishing=vanishing_below, exploding=exploding_above))
    report = policy.apply(report)
    for kind, destination in zip(formats, destinations, strict=True):
        _emit(report, kind, destination)
    if plot is not None:
        _plot(report, plot)
    failed = gate.fails(report) and not exit_zero
    raise typer.Exit(ExitCode.PROBLEMS if failed else ExitCode.OK)


@app.command(epilog="Chain mode (--factor) imports no torch and answers instantly.")
def simulate(
    depth: Annotated[int, typer.Option(help="Number of layers (or chain factors).")] = 50,
    factor: Annotated[float | None, typer.Option(help="Chain mode: the gradient after k layers is factor**k.")] = None,
    activation: Annotated[
        str, typer.Option(help="Network mode: linear, relu, leaky_relu, tanh, sigmoid, gelu, silu, elu.")
    ] = "relu",
    init: Annotated[
        str,
        typer.Option(
            help="Network mode: normal, default, xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal, "
            "orthogonal."
        ),
    ] = "default",
    width: Annotated[int, typer.Option(help="Network mode: units per layer.")] = 256,
    weight_scale: Annotated[float, typer.Option(help="Multiply every weight by this after init.")] = 1.0,
    bias_std: Annotated[
        float | None, typer.Option(help="Biases ~ N(0, B²) (default: zero, or PyTorch's for default init).")
    ] = None,
    residual: Annotated[bool, typer.Option("--residual", help="Shortcut x + f(x) around every layer.")] = False,
    norm: Annotated[str | None, typer.Option(help="Normalise before every layer: batch or layer.")] = None,
    seeds: Annotated[int, typer.Option(help="Monte Carlo: random networks per configuration.")] = 3,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="First random seed.")] = 0,
    compare: Annotated[
        bool, typer.Option("--compare", help="Each remedy side by side, ranked by gain closeness to 1.")
    ] = False,
    map_name: Annotated[str | None, typer.Option("--map", help="The iterated map to illustrate: logistic.")] = None,
    r: Annotated[float, typer.Option("--r", help="Logistic map parameter r in f(x) = r·x(1−x).")] = 3.5,
    iterations: Annotated[int, typer.Option(help="Logistic map: number of iterations.")] = 6,
    rnn: Annotated[
        bool, typer.Option("--rnn", help="Backpropagation through time in a random recurrent cell.")
    ] = False,
    steps: Annotated[int, typer.Option(help="RNN mode: time steps.")] = 100,
    radius: Annotated[float, typer.Option(help="RNN mode: spectral radius of the recurrent matrix.")] = 1.0,
    cell: Annotated[str, typer.Option(help="RNN mode: rnn (tanh), lstm, gru, or linear (exactly ρ per step).")] = "rnn",
    hidden: Annotated[int, typer.Option(help="RNN mode: hidden units.")] = 128,
    output_format: Annotated[OutputFormat, typer.Option("--format", "-f", help="Report format.")] = OutputFormat.text,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the simulation to FILE.png or FILE.svg (needs [plot]).")
    ] = None,
) -> None:
    """Show how gradients shrink or grow with depth: the chain product, mean-field theory and real random nets."""
    modes = [flag for flag, on in (("--factor", factor is not None), ("--map", map_name is not None), ("--rnn", rnn),
                                   ("--compare", compare)) if on]  # fmt: skip
    if len(modes) > 1:
        raise GradcheckError(f"choose one mode: {' and '.join(modes)} cannot be combined")
    if factor is not None:
        from gradcheck_cli.simulate.chain import simulate_chain

        report = simulate_chain(depth, factor)
    elif map_name is not None:
        if map_name != "logistic":
            raise GradcheckError(f"--map {map_name!r}: the only map is 'logistic'")
        from gradcheck_cli.simulate.logistic import simulate_logistic_map

        report = simulate_logistic_map(r, iterations)
    else:
        with _status("simulating random networks…"):
            if rnn:
                from gradcheck_cli.simulate.rnn import simulate_rnn

                report = simulate_rnn(steps, radius, cell=cell, hidden=hidden, seeds=seeds, seed=seed)
            else:
                from gradcheck_cli.simulate.network import NetworkSpec, simulate_compare, simulate_network

                spec = NetworkSpec(
                    depth=depth, activation=activation, init=init, width=width, weight_scale=weight_scale,
                    bias_std=bias_std, residual=residual, norm=norm, seeds=seeds, seed=seed,
                )  # fmt: skip
                report = simulate_compare(spec) if compare else simulate_network(spec)
    _check_plot_suffix(plot)
    if plot is not None and output is not None:
        check_distinct((plot, output), "--plot and --output name the same file; give each its own")
    _emit_simulation(report, output_format, output)
    if plot is not None:
        _plot(report, plot)


def _emit_simulation(report: Any, output_format: OutputFormat, output: Path | None) -> None:
    from gradcheck_cli.render.json import render_json
    from gradcheck_cli.render.simulate_text import render_simulation_text, simulation_view

    if output_format is OutputFormat.json:
        _write(render_json(report), output)
    elif output is None:
        Console(highlight=False, soft_wrap=False).print(simulation_view(report))
    else:
        _write(render_simulation_text(report), output)


def _check_plot_suffix(path: Path | None) -> None:
    """Before any work: ``--plot`` draws PNG or SVG, chosen by the file's suffix."""
    if path is not None and path.suffix.lower() not in (".png", ".svg"):
        raise GradcheckError(f"--plot {path}: the file must end in .png or .svg")


def _plot(report: Any, path: Path) -> None:
    """``--plot``: the picture of ``report`` (inspect or simulate) drawn to ``path``; one stderr line says where."""
    from gradcheck_cli.render.plot import plot_report, plot_simulation
    from gradcheck_cli.render.printable import printable
    from gradcheck_cli.report.report import Report

    draw = plot_report if isinstance(report, Report) else plot_simulation
    report = printable(report)
    write_with(path, lambda temporary: draw(report, temporary), "--plot")
    Console(stderr=True, highlight=False).print(f"gradcheck: chart written to {path}", markup=False)


def _write(rendered: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(rendered)
        return
    write_text(output, rendered)


def _check_step_summary(formats: list[ReportFormat], guard: OutputGuard) -> None:
    """``--format github`` appends to ``$GITHUB_STEP_SUMMARY``: never when that names an input."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and ReportFormat.github in formats:
        guard.check(Path(summary), "$GITHUB_STEP_SUMMARY")


def _emit(report: Any, kind: ReportFormat, output: Path | None) -> None:
    """Render one format to its destination; GitHub output also appends the step summary when CI sets one.

    Every format but JSON (whose encoder escapes them) shows the file's names with control characters escaped.
    """
    from gradcheck_cli.render.printable import printable

    report = report if kind is ReportFormat.json else printable(report)
    if kind is ReportFormat.text and output is None:
        from gradcheck_cli.render.text import text_report

        Console(highlight=False, soft_wrap=False).print(text_report(report))
        return
    _write(_render(report, kind), output)
    if kind is ReportFormat.github and os.environ.get("GITHUB_STEP_SUMMARY"):
        from gradcheck_cli.render.github import render_step_summary

        summary = Path(os.environ["GITHUB_STEP_SUMMARY"])
        try:
            with summary.open("a", encoding="utf-8") as handle:
                handle.write(render_step_summary(report))
        except OSError as exc:
            raise GradcheckError(f"cannot append to $GITHUB_STEP_SUMMARY {summary}: {exc.strerror or exc}") from None
    if output is not None:
        verdict = "healthy" if report.healthy else "unhealthy: " + ", ".join(p.value for p in report.problems)
        Console(stderr=True, highlight=False).print(f"gradcheck: {verdict}; {kind.value} report written to {output}")


def _render(report: Any, kind: ReportFormat) -> str:
    return renderer(kind)(report)


def _print_examples() -> None:
    from gradcheck_cli.load.examples import EXAMPLES

    width = max(len(name) for name in EXAMPLES)
    for example in EXAMPLES.values():
        typer.echo(f"{example.name:{width}}  {example.expected:11} {example.summary}")


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up and the CLI's own import), 0 where unknown."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _status(message: str) -> AbstractContextManager[Any]:
    """A spinner on stderr while the model loads and runs, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return nullcontext()
    return Console(stderr=True).status(message)


def _one_line(text: str) -> str:
    """Escape control characters (a newline inside a key name, say) so an error stays one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _exit(code: int) -> NoReturn:
    """``sys.exit``; after a ``--distributed`` run, without the interpreter's teardown: gloo in torch 2.13 can
    abort a rank on the way out ("terminate called without an active exception") after all work is done,
    which would turn its exit code into a signal."""
    if any(arg == "--distributed" or arg.startswith("--distributed=") for arg in sys.argv[1:]):
        with contextlib.suppress(OSError):  # a closed pipe must not turn the exit into a traceback
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main() -> None:
    """Console entry point: run the app and turn every outcome into a documented exit code.

    Warnings raised while it runs (torch's, NumPy's, the model's) are held back: shown after a run that
    finished, dropped before an exit-2 error, whose message stays one line.
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with warnings.catch_warnings(record=True) as held:
        code = _run(err)
    if code in (ExitCode.OK, ExitCode.PROBLEMS, ExitCode.INTERNAL_ERROR):
        for warning in held:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    _exit(code)


def _run(err: Console) -> int:
    """``app()``, every exception turned into its exit code and its message on stderr."""
    try:
        return int(app(standalone_mode=False) or 0)
    except GradcheckError as exc:
        return _refused(err, exc)
    except typer.Abort:
        err.print("aborted")
        return ExitCode.UNUSABLE_INPUT
    except _ClickException as exc:
        exc.show()  # type: ignore[attr-defined]
        return ExitCode.UNUSABLE_INPUT
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # app() returns its own exit codes (standalone_mode=False): this is the user's code
        return _refused(err, ModelCodeError(f"the model's code called sys.exit({exc.code!r}) while gradcheck ran it; "
                                            "a model that exits cannot be judged: remove the call"))  # fmt: skip
    except Exception as exc:
        if is_out_of_memory(exc):
            return _refused(err, OutOfMemory(f"ran out of memory ({first_line(exc)}); try a smaller batch or a "
                                             "machine (or --device) with more memory"))  # fmt: skip
        traceback.print_exc()
        err.print(
            "gradcheck hit an internal error (exit 3). Please report it with the command you ran and the "
            "traceback above at the project's issue tracker.",
            markup=False,
        )
        return ExitCode.INTERNAL_ERROR
    except BaseException as exc:  # GeneratorExit or a custom BaseException from the model's code
        message = f"the model's code raised {type(exc).__name__}: {first_line(exc)}; gradcheck cannot judge it"
        return _refused(err, ModelCodeError(message))


def _refused(err: Console, exc: GradcheckError) -> int:
    """The one-line error of exit code 2 (with ``--debug``, the traceback of its cause first)."""
    if "--debug" in sys.argv[1:]:
        cause = exc.__cause__ or exc.__context__  # `raise ... from None` keeps the original as context
        traceback.print_exception(cause if cause is not None else exc)
    where = f" (rank {_rank()})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    err.print(f"error{where}: {_one_line(str(exc))}", markup=False)
    return ExitCode.UNUSABLE_INPUT
