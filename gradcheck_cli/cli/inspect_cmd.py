"""``gradcheck inspect``: its flags translated into the core's settings, the pipeline run, the report gated
and delivered.

torch is imported only inside the command (in the ``--profile`` phase ``import``), so ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gradcheck_cli.cli.config_defaults import apply_config, configuration, from_config, given
from gradcheck_cli.cli.console import baseline_written, print_profile, process_age, status
from gradcheck_cli.cli.delivery import Delivery
from gradcheck_cli.cli.gating import Gate
from gradcheck_cli.cli.options import (
    DebugOption,
    ExitZeroOption,
    FailOnOption,
    FormatsOption,
    IgnoreLayerOption,
    IgnoreOption,
    OutputsOption,
    SelectOption,
    rank,
    thresholds,
)
from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.exitcodes import ExitCode
from gradcheck_cli.render.registry import ReportFormat
from gradcheck_cli.settings import Autocast, Distributed, Optimizer, ProbeSettings

if TYPE_CHECKING:
    from gradcheck_cli.report.report import Report


def _list_examples(value: str | None) -> str | None:
    """The eager ``--example`` callback: ``--example list`` shows the built-in models and exits, before any
    configuration is read."""
    if value != "list":
        return value
    from gradcheck_cli.load.examples import EXAMPLES

    width = max(len(name) for name in EXAMPLES)
    for example in EXAMPLES.values():
        typer.echo(f"{example.name:{width}}  {example.expected:11} {example.summary}")
    raise typer.Exit(ExitCode.OK)


def inspect(
    ctx: typer.Context,
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
        typer.Option(
            "--example",
            help="Inspect a built-in model instead of a file; 'list' shows them.",
            is_eager=True,
            callback=_list_examples,
        ),
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
            help="Architecture for weights-only files: 'package.module:factory', 'path/file.py:factory' or "
            "'path/file.py' (its one nn.Module class; also the script whose __main__ classes a pickled model needs). "
            "Only the file's definitions are run, never its top-level code.",
        ),
    ] = None,
    trust: Annotated[
        bool, typer.Option("--trust", help="Allow unpickling code from the checkpoint (only for files you trust).")
    ] = False,
    loss_output: Annotated[
        str | None,
        typer.Option(
            "--loss-output",
            help="Which output of a model that returns several the loss uses: an index (0) or a key; "
            "default: the first (the report says which it used).",
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict/--no-strict",
            help="Weights must match --model key for key (load_state_dict's strict); --no-strict loads what fits "
            "and lists what was ignored or left missing.",
        ),
    ] = True,
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
        Path | None,
        typer.Option(
            "--write-baseline",
            help="Store this run's report as a baseline, accepting what it finds: exit 0 (with --baseline too, the "
            "exit code judges the comparison with that one).",
        ),
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="With --baseline: allowed change per layer, in orders of magnitude (1).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Read settings from this file instead of pyproject.toml.",
            is_eager=True,
            callback=apply_config,
        ),
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
        Autocast | None,
        typer.Option(
            help="Probe under torch.autocast in fp16 (with loss scaling) or bf16, and forecast what half precision "
            "loses (the precision section, GC013/GC014; a float32 model gets it only with this flag)."
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(min=0, max=10_000, help="Optimisation probe: optimiser steps on the batch, on a copy (0).")
    ] = 0,
    lr: Annotated[float, typer.Option(help="Optimisation probe: learning rate (1e-3).")] = 1e-3,
    optimizer: Annotated[Optimizer, typer.Option(help="Optimisation probe: the optimiser.")] = Optimizer.sgd,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the gradient-flow chart to FILE.png, FILE.svg or FILE.pdf.")
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
    configured = configuration(ctx)
    if example is not None:  # a configured model or input is for checkpoints: only the flags count here
        flags = [flag for name, flag in _EXAMPLE_BRINGS if given(ctx, name)]
        if flags:
            raise GradcheckError(f"--example brings its own model and batch; drop {', '.join(flags)}")
        batch = model = None
    elif input_shape is not None and from_config(ctx, "batch"):
        batch = None
    if write_baseline is not None and from_config(ctx, "baseline"):  # a new baseline is not compared with the old
        baseline = None
    note = None
    if model is not None and from_config(ctx, "model"):  # it names code: run only with --trust (issue 16)
        configured.model_spec(trust=trust)
        note = configured.model_note()
    gate = Gate.of(fail_on, select, ignore, ignore_layer, exit_zero)
    if (checkpoint is None) == (example is None):
        raise GradcheckError(
            "give either a CHECKPOINT or --example NAME (try: gradcheck inspect --example deep-sigmoid)"
        )
    inputs = (checkpoint, batch, baseline, _model_file(model), configured.source)
    formats = output_format or [ReportFormat.text]
    delivery = Delivery.plan(ctx, formats, output or [], inputs, plot, write_baseline)
    settings = ProbeSettings(
        seed=0 if seed is None else seed, train=not eval_mode, unfreeze=unfreeze,
        thresholds=thresholds(vanishing_below, exploding_above), verify=not no_verify, autocast=autocast,
        steps=steps, lr=lr, optimizer=optimizer,
        loss_output=None if loss_output is None else (int(loss_output) if loss_output.isdigit() else loss_output),
    )  # fmt: skip
    _refuse_conflicts(settings, batch, input_shape, distributed, example)

    from gradcheck_cli.timing import phase, recording

    with status("probing gradients…"), recording() as phases:
        if profile:
            phases["startup"] = process_age()
        with phase("import"):
            from gradcheck_cli.load.limits import set_memory_budget
            from gradcheck_cli.load.synthetic import parse_shape
            from gradcheck_cli.pipeline import InspectRequest, run_inspect

        set_memory_budget(max_memory)  # None: $GRADCHECK_MAX_MEMORY, else the default
        request = InspectRequest(
            checkpoint=checkpoint, example=example, batch=batch, model_spec=model, trust=trust, strict=strict,
            device=device or "cpu", input_shape=None if input_shape is None else parse_shape(input_shape),
            input_dtype=input_dtype, settings=settings, distributed=distributed, timeout=timeout,
        )  # fmt: skip
        report = run_inspect(request)
    report = gate.policy.apply(report)
    if note is not None:  # issue 16: the report names the file that named the model code
        report = replace(report, notes=(*report.notes, note))
    if baseline is not None:  # every rank compares (reading only), so all of them exit alike
        from gradcheck_cli.gate.baseline import DEFAULT_TOLERANCE, compare

        allowed = tolerance if tolerance is not None else DEFAULT_TOLERANCE
        report = compare(report, baseline, allowed, gate.policy.keeps, gate.policy.layer_ignored)
    if distributed is None or rank() == 0:  # every rank built the same report: rank 0 writes it
        _deliver(report, delivery, write_baseline, phases if profile else None)
    if write_baseline is not None and baseline is None:  # recording a baseline accepts the state it records
        raise typer.Exit(ExitCode.OK)
    raise typer.Exit(gate.exit_code(report))


def _model_file(spec: str | None) -> Path | None:
    """The script ``--model`` names (``file.py`` or ``file.py:factory``): an input no output may replace."""
    script = (spec.rpartition(":")[0] or spec) if spec else ""
    return Path(script) if script.endswith(".py") else None


_EXAMPLE_BRINGS = (("batch", "--input"), ("model", "--model"), ("input_shape", "--input-shape"))
"""What ``--example`` replaces: each parameter and its flag."""


def _refuse_conflicts(
    settings: ProbeSettings, batch: Path | None, input_shape: str | None, distributed: Distributed | None,
    example: str | None,
) -> None:  # fmt: skip
    """Flags that cannot run together, refused before any work."""
    if input_shape is not None and batch is not None:
        raise GradcheckError("give either --input or --input-shape, not both")
    defaults = ProbeSettings()
    if settings.steps == 0 and (settings.lr != defaults.lr or settings.optimizer is not defaults.optimizer):
        raise GradcheckError("--lr and --optimizer set the optimisation probe; add --steps N to run it")
    if distributed is not None and (settings.steps or settings.autocast is not None or example is not None):
        on = (("--steps", settings.steps), ("--autocast", settings.autocast), ("--example", example))
        raise GradcheckError(f"--distributed does not run with {', '.join(f for f, value in on if value)} yet; drop it")


def _deliver(report: Report, delivery: Delivery, write_baseline: Path | None, phases: dict[str, float] | None) -> None:
    """Store the baseline, then render every format and the chart; with ``--profile``, time them too."""
    if write_baseline is not None:
        from gradcheck_cli.gate.baseline import write_baseline as store

        store(report, write_baseline)
        baseline_written(report, write_baseline)
    from gradcheck_cli.timing import phase, recording

    if phases is not None:
        report = replace(report, timing=dict(phases))
    with recording() as rendering, phase("render"):
        delivery.deliver(report)
    if phases is not None:
        print_profile({**phases, **rendering})
