"""The pytest integration: ``assert_gradients_healthy``, the ``gradcheck`` fixture and the plugin's loading.

The user-style suites run in a temporary directory through ``pytester``, loading the plugin with
``-p gradcheck_cli.pytest_plugin`` as a user without the installed entry point would; the entry point
itself is exercised through a throwaway ``.dist-info`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradcheck_cli.pytest_plugin as plugin
from gradcheck_cli.pytest_plugin import GradientHealthError, assert_gradients_healthy, failure_message
from gradcheck_cli.report.report import Finding, LayerStats, PathSummary, Problem, Report, RunInfo, Severity

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "gradcheck_cli.pytest_plugin")
ROOT = Path(__file__).resolve().parent.parent
CI_DOC = ROOT / "docs" / "ci.md"

USER_SUITE = '''
"""A user's model tests: the healthy model passes, the sick one fails with gradcheck's message."""

import pytest
import torch
from torch import nn

from gradcheck_cli.pytest_plugin import assert_gradients_healthy


def mlp(depth, width, activation, kaiming=False):
    layers = []
    for i in range(depth):
        linear = nn.Linear(width, width if i < depth - 1 else 10)
        if kaiming:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


@pytest.fixture
def healthy():
    torch.manual_seed(0)
    return mlp(50, 128, nn.ReLU, kaiming=True), (torch.randn(32, 128), torch.randint(0, 10, (32,)))


@pytest.fixture
def sick():
    torch.manual_seed(0)
    return mlp(50, 64, nn.Sigmoid), (torch.randn(32, 64), torch.randint(0, 10, (32,)))


def test_healthy_with_fixture(gradcheck, healthy):
    model, batch = healthy
    report = gradcheck(model, batch)
    assert report.healthy
    assert 0.9 < gradcheck.check(model, batch).path.gain < 1.1


def test_healthy_with_function(healthy):
    model, batch = healthy
    assert_gradients_healthy(model, batch, vanishing=1e-2, exploding=1e2)


def test_sick_with_fixture(gradcheck, sick):
    gradcheck.assert_healthy(*sick)


def test_sick_with_function(sick):
    assert_gradients_healthy(*sick)
'''


def sick_model() -> nn.Sequential:
    """The 50-layer sigmoid MLP with PyTorch's default init: the gradient vanishes."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(50):
        layers.append(nn.Linear(32, 32 if i < 49 else 10))
        if i < 49:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(8, 32), torch.randint(0, 10, (8,))


def test_user_suite_passes_healthy_and_fails_sick_with_gradchecks_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_models=USER_SUITE)
    result = pytester.runpytest(*PLUGIN, "-q")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines(
        ["FAILED test_models.py::test_sick_with_fixture - *", "FAILED test_models.py::test_sick_with_function - *"]
    )
    assert out.count("E       gradcheck_cli.pytest_plugin.GradientHealthError: gradcheck: unhealthy") == 2
    # count the traceback lines only: with CI set, pytest also prints the whole message in the short summary
    failure_lines = [line for line in out.splitlines() if line.startswith("E")]
    assert sum("gradcheck: unhealthy: vanishing (fail_on=error)" in line for line in failure_lines) == 2
    result.stdout.fnmatch_lines(
        [
            "E  *worst layers (5 of 50; ∂L/∂h ÷ the output end's):",
            "E  *0  Linear  0 (underflow)  flags: vanishing",
            "E  *2  Linear  0 (underflow)  flags: vanishing",
            "E  *… and * more flagged layer(s), 10 to * in forward order",
            "E  *findings:",
            "E  *GC001 error vanishing-gradient *",
            "E  *recommendations (ordered by the effect verified on a copy):",
            "E  *1. [[]batch_norm[]] Add batch normalisation * (verified: healthy on a copy)",
            "E  *nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU())",
            "E  *[[]activation_change[]] Use a non-saturating activation* (verified: healthy on a copy)",
            "E  *nn.ReLU()*",
            "E  *[[]xavier_init[]]* (tried on a copy: not enough alone)",
        ]
    )
    # the traceback stops at the user's line: gradcheck's own frames are hidden
    assert "gradcheck.assert_healthy(*sick)" in out and "assert_gradients_healthy(*sick)" in out
    assert "__tracebackhide__" not in out and "def assert_gradients_healthy(" not in out


def test_fixture_is_provided_by_the_pytest11_entry_point(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = pytester.mkdir("site")
    info = site / "gradcheck_entry_point-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gradcheck-entry-point\nVersion: 0\n")
    # the name pyproject.toml gives the entry point: the module path, so -p and pytest_plugins never clash with it
    (info / "entry_points.txt").write_text("[pytest11]\ngradcheck_cli.pytest_plugin = gradcheck_cli.pytest_plugin\n")
    pytester.makepyfile(
        test_entry="""
        from gradcheck_cli.pytest_plugin import GradientChecker

        def test_fixture(gradcheck, pytestconfig):
            assert isinstance(gradcheck, GradientChecker)
            manager = pytestconfig.pluginmanager
            assert manager.has_plugin("gradcheck_cli.pytest_plugin")
            # registered by the autoload of the throwaway distribution's pytest11 entry point, nothing else
            loaded = {module.__name__: dist.metadata["Name"] for module, dist in manager.list_plugin_distinfo()}
            assert loaded.get("gradcheck_cli.pytest_plugin") == "gradcheck-entry-point", loaded
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(site))
    # no conftest and no -p: only the entry point's autoload can provide the fixture
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.runpytest_subprocess("-q").assert_outcomes(passed=1)
    # the control: with the autoload off, nothing else provides the fixture
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    disabled = pytester.runpytest_subprocess("-q")
    disabled.assert_outcomes(errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'gradcheck' not found*"])
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD")

    # loading it explicitly as well (conftest pytest_plugins, -p) never clashes with the entry point
    pytester.makeconftest('pytest_plugins = ["gradcheck_cli.pytest_plugin"]')
    pytester.makepyfile(
        test_entry="""
        from gradcheck_cli.pytest_plugin import GradientChecker

        def test_fixture(gradcheck, pytestconfig):
            assert isinstance(gradcheck, GradientChecker)
            assert pytestconfig.pluginmanager.has_plugin("gradcheck_cli.pytest_plugin")
        """
    )
    pytester.runpytest_subprocess("-q").assert_outcomes(passed=1)
    pytester.runpytest_subprocess(*PLUGIN, "-q").assert_outcomes(passed=1)


def test_collecting_a_suite_that_never_uses_the_fixture_does_not_import_torch(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert 1 + 1 == 2\n")
    pytester.makeconftest(
        """
        def pytest_collection_finish(session):
            print("gradcheck plugin loaded:", session.config.pluginmanager.has_plugin("gradcheck_cli.pytest_plugin"))
        """
    )
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # only our plugin, none of the venv's
    result = pytester.run(sys.executable, "-X", "importtime", "-m", "pytest", "--co", "-q", *PLUGIN)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["gradcheck plugin loaded: True"])
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.lines if line.startswith("import time:")}
    assert "gradcheck_cli.gate.fail_on" in imported  # the plugin's own imports are timed (it is imported by importlib)
    assert not {name for name in imported if name == "torch" or name.startswith("torch.")}


def test_assert_returns_the_report_when_the_gate_passes() -> None:
    report = assert_gradients_healthy(sick_model(), batch(), fail_on="never")
    assert not report.healthy and report.problems == (Problem.VANISHING,)
    assert report.thresholds == {"vanishing_attenuation": 1e-3, "exploding_attenuation": 1e3}
    assert report.run.batch_source == "passed to assert_gradients_healthy()"


def test_failure_is_an_assertion_error_that_carries_the_report() -> None:
    with pytest.raises(AssertionError) as caught:
        assert_gradients_healthy(sick_model(), batch(), fail_on=(name for name in ["exploding", "vanishing"]))
    error = caught.value
    assert isinstance(error, GradientHealthError)
    assert error.report.problems == (Problem.VANISHING,)
    message = str(error)
    assert message.startswith("gradcheck: unhealthy: vanishing (fail_on=exploding,vanishing)\n")
    assert "path: input end (0) / output end (98) = 0 (underflow) over 50 calls" in message
    assert "thresholds: vanishing below 0.001, exploding above 1000" in message


def test_gate_by_problem_name_passes_a_model_without_that_problem() -> None:
    # the gate passes although the model is sick: it only fails on the problem it names
    report = assert_gradients_healthy(sick_model(), batch(), fail_on="exploding")
    assert not report.healthy
    assert report.problems == (Problem.VANISHING,)


def test_thresholds_reach_the_report() -> None:
    lenient = assert_gradients_healthy(sick_model(), batch(), vanishing=1e-300, fail_on="never")
    assert lenient.thresholds["vanishing_attenuation"] == 1e-300


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vanishing": 0.0}, "0 < vanishing < 1 < exploding"),
        ({"vanishing": 2.0}, "0 < vanishing < 1 < exploding"),
        ({"exploding": 0.5}, "0 < vanishing < 1 < exploding"),
        ({"fail_on": "sometimes"}, "fail_on 'sometimes' is not one of"),
    ],
)
def test_bad_arguments_raise_value_error_before_probing(kwargs: dict[str, object], match: str) -> None:
    model = sick_model()
    with pytest.raises(ValueError, match=match):
        assert_gradients_healthy(model, batch(), **kwargs)  # type: ignore[arg-type]
    assert all(p.grad is None for p in model.parameters())


def test_works_without_pytest_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytest", None)  # `import pytest` now raises ModuleNotFoundError
    spec = importlib.util.spec_from_file_location("gradcheck_plugin_without_pytest", plugin.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "gradcheck_fixture")
    with pytest.raises(AssertionError, match="GC001"):
        module.assert_gradients_healthy(sick_model(), batch())


def layer(name: str, position: int, rel: float | None, *flags: str) -> LayerStats:
    return LayerStats(
        name=name,
        type="Linear",
        position=position,
        calls=1,
        params=10,
        frozen=False,
        weight_norm=1.0,
        grad_norm=None if rel is None else 1.0,
        act_grad_norm=rel,
        act_grad_rel=rel,
        flags=flags,
    )


def hand_report(layers: tuple[LayerStats, ...], findings: tuple[Finding, ...]) -> Report:
    run = RunInfo("python object", "module", "Net", 70, "train", 0, "float32[2, 4]", "test", "mse", "mse", 0.5)
    path = PathSummary("activation_gradients", len(layers), 1e-4, 0.5, layers[0].name, layers[-1].name)
    return Report(run, layers, path, findings, (), ("a caveat",), {"vanishing_attenuation": 1e-3})


def test_worst_layers_rank_by_orders_of_magnitude_from_the_output_end() -> None:
    layers = (
        layer("in", 0, 1e-2),
        layer("cut", 1, None, "no_gradient"),
        layer("mid", 2, 1e4, "exploding"),
        layer("quiet", 3, None),
        layer("nan", 4, math.nan, "non_finite"),
        layer("zero", 5, 0.0, "vanishing"),
        layer("near", 6, 0.5),
        layer("out", 7, 1.0),
    )
    report = hand_report(layers, ())
    ranked = [stats.name for stats, _ in plugin._worst_layers(report)]
    assert ranked == ["cut", "nan", "zero", "mid", "in", "near", "out"]  # "quiet" was never measured
    message = failure_message(report, worst=3)
    assert "worst layers (3 of 8;" in message
    assert "  cut   Linear   not measured  flags: no_gradient" in message
    assert "  nan   Linear            nan  flags: non_finite" in message
    assert "  … and 1 more flagged layer(s)\n" in message
    assert "note: a caveat" in message
    assert "thresholds: n/a" in message


def test_message_for_a_gate_failed_by_a_warning_says_the_model_is_healthy() -> None:
    warning = Finding("GC008", "vanishing-through-time", Severity.WARNING, Problem.VANISHING, "lstm", "1e-18 of it")
    report = hand_report((layer("lstm", 0, 1.0), layer("head", 1, 1.0)), (warning,))
    message = failure_message(report, fail_on="warning")
    assert message.splitlines()[0] == "gradcheck: healthy, but findings fail the gate (fail_on=warning)"
    assert "  GC008 warning vanishing-through-time [lstm]: 1e-18 of it" in message
    assert "recommendations" not in message


def test_fixture_checker_measures_without_asserting() -> None:
    report = plugin.GradientChecker().check(sick_model(), batch())
    assert report.problems == (Problem.VANISHING,)


def test_fixture_returns_a_gradient_checker_callable_as_assert_healthy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_doc=textwrap.dedent(
            """
            from gradcheck_cli.pytest_plugin import GradientChecker

            def test_type(gradcheck):
                assert type(gradcheck) is GradientChecker
                assert gradcheck.__call__ == gradcheck.assert_healthy
            """
        )
    )
    pytester.runpytest(*PLUGIN, "-q").assert_outcomes(passed=1)


def test_the_example_test_in_the_docs_passes_as_written(pytester: pytest.Pytester) -> None:
    blocks = re.findall(r"```python\n(# tests/test_model_gradients.py\n.*?)```", CI_DOC.read_text(), re.S)
    assert len(blocks) == 1
    pytester.makepyfile(test_model_gradients=blocks[0])
    pytester.runpytest(*PLUGIN, "-q").assert_outcomes(passed=4)


def test_pre_commit_manifest_runs_gradcheck_inspect_on_checkpoint_changes() -> None:
    yaml = pytest.importorskip("yaml")
    hooks = {hook["id"]: hook for hook in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())}
    assert set(hooks) == {"gradcheck", "gradcheck-system"}
    assert hooks["gradcheck"]["language"] == "python" and hooks["gradcheck-system"]["language"] == "system"
    for hook in hooks.values():
        assert {"id", "name", "entry", "language"} <= set(hook)
        assert hook["entry"] == "gradcheck inspect" and hook["pass_filenames"] is False
        files = re.compile(hook["files"])
        assert all(files.search(f) for f in ("model.pt", "ckpt/last.ckpt", "w.safetensors", "prog.pt2", "b.npz"))
        assert not any(files.search(f) for f in ("model.py", "README.md", "model.pt.txt"))


def test_yaml_recipes_in_the_ci_doc_parse() -> None:
    yaml = pytest.importorskip("yaml")
    blocks = re.findall(r"```yaml\n(.*?)```", CI_DOC.read_text(), re.S)
    assert len(blocks) == 4
    workflow, gitlab, _, pre_commit = (yaml.safe_load(block) for block in blocks)
    gate = next(step for step in workflow["jobs"]["gradcheck"]["steps"] if step.get("name") == "Gradient health gate")
    formats = (
        "--format sarif --output gradcheck.sarif --format junit --output gradcheck.xml "
        "--format html --output gradcheck.html --format github"
    )
    assert formats in gate["run"]
    keep = next(step for step in workflow["jobs"]["gradcheck"]["steps"] if step.get("name") == "Keep the reports")
    assert "gradcheck.html" in keep["with"]["path"]
    assert gitlab["gradcheck"]["artifacts"]["reports"]["junit"] == "gradcheck.xml"
    assert pre_commit["repos"][0]["hooks"][0]["id"] == "gradcheck"


def test_a_program_whose_path_is_not_measured_never_passes_as_healthy() -> None:
    """A TorchScript stack without biases: no hook fires and no bias reads the path, so the assertion fails
    (``fail_on="never"`` still passes: the caller asked for no gate)."""
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(6)]))
    batch = torch.randn(8, 16)
    with pytest.raises(GradientHealthError) as caught:
        assert_gradients_healthy(model, batch)
    assert str(caught.value).startswith("gradcheck: not measured: the gradient path could not be measured")
    assert caught.value.report.status == "not_measured"
    assert assert_gradients_healthy(model, batch, fail_on="never").status == "not_measured"
