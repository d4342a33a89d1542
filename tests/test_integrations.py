"""The Lightning and Hugging Face callbacks: real ``Trainer`` runs (tiny models, a few steps, CPU) whose
history ``read_history`` (what ``gradcheck history`` reads) takes back.

The ``test`` extra installs Lightning, accelerate and TensorBoard, so none of these is skipped in CI;
``importorskip`` only keeps a bare install from erroring.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from gradcheck_cli.training.history import history_report
from gradcheck_cli.training.log import History, read_history
from gradcheck_cli.training.monitor import GradientProblemError

STOPPING = {"non_finite", "exploding"}

# ---------------------------------------------------------------------- shared


def _history(path: Path) -> History:
    history = read_history(path)
    assert history.skipped_lines == 0
    return history


def _no_hooks_left(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks, type(module).__name__
        assert not module._forward_pre_hooks, type(module).__name__
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def _regression(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :1] * 2.0 + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


# ---------------------------------------------------------------------- Lightning


def _lightning() -> Any:
    return pytest.importorskip("lightning.pytorch")


def _module(lr: float = 0.05) -> Any:
    pl = _lightning()

    class TinyRegressor(pl.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
            self.norms: dict[int, float] = {}
            """The total gradient norm this module sees in its own hook, per global step."""
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            self.log("train_loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.norms[self.trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return TinyRegressor()


def _trainer(tmp_path: Path, callback: Any, **kwargs: Any) -> Any:
    pl = _lightning()
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 6,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
        "callbacks": [callback],
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def _loader(batch_size: int = 8, **kwargs: Any) -> DataLoader[Any]:
    return DataLoader(_regression(**kwargs), batch_size=batch_size)


@pytest.mark.slow
def test_lightning_writes_history_at_global_steps(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    from gradcheck_cli.integrations.lightning import GradcheckCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckCallback(every=2, log=log)
    module = _module()
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, callback, logger=logger, log_every_n_steps=1, gradient_clip_val=1e-4)
    trainer.fit(module, _loader())

    assert trainer.global_step == 6
    history = _history(log)
    assert history.header.every == 2
    assert history.header.model == "TinyRegressor"
    assert [r.step for r in history.records] == [0, 2, 4]
    for record, verdict in zip(history.records, history.verdicts, strict=True):
        assert [layer.name for layer in record.layers] == ["net.0", "net.2", "net.4"]
        assert [layer.type for layer in record.layers] == ["Linear"] * 3
        assert record.micro_batches == 1
        assert record.loss is not None
        assert record.loss == pytest.approx(module.losses[record.step], rel=1e-5)
        # the unclipped norm: Lightning clips to 1e-4 only after on_before_optimizer_step
        assert record.total_norm == pytest.approx(module.norms[record.step], rel=1e-4)
        assert record.total_norm > 1e-2
        assert all(layer.grad is not None for layer in record.layers)
        assert all(layer.calls for layer in record.layers)  # activation gradients were measured
        assert verdict["status"] == "healthy"
    _no_hooks_left(module)

    with (Path(logger.log_dir) / "metrics.csv").open() as f:
        table = list(csv.DictReader(f))
    # Lightning logs the metrics of global step s at step s: the records' numbering
    logged_loss = {int(row["step"]): float(row["train_loss"]) for row in table if row.get("train_loss")}
    assert logged_loss == pytest.approx({step: module.losses[step] for step in range(6)}, rel=1e-5)
    rows = [row for row in table if row.get("gradcheck/total_norm")]
    assert [int(row["step"]) for row in rows] == [0, 2, 4]
    # the gain and attenuation each record's verdict holds in the log (read_history keeps only status, problems)
    written = [entry for line in log.read_text().splitlines() if (entry := json.loads(line))["kind"] == "record"]
    assert [entry["step"] for entry in written] == [0, 2, 4]
    for row, record, entry in zip(rows, history.records, written, strict=True):
        assert float(row["gradcheck/total_norm"]) == pytest.approx(record.total_norm, rel=1e-5)
        assert float(row["gradcheck/problems"]) == 0
        gain, attenuation = float(row["gradcheck/gain"]), float(row["gradcheck/attenuation"])
        assert math.isfinite(gain) and gain > 0
        assert math.isfinite(attenuation) and attenuation > 0
        assert gain == pytest.approx(entry["gain"], rel=1e-5)
        assert attenuation == pytest.approx(entry["attenuation"], rel=1e-5)


@pytest.mark.slow
def test_lightning_gradient_accumulation_records_optimizer_steps(tmp_path: Path) -> None:
    from gradcheck_cli.integrations.lightning import GradcheckCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckCallback(every=1, log=log)
    module = _module()
    trainer = _trainer(tmp_path, callback, max_steps=4, accumulate_grad_batches=2)
    trainer.fit(module, _loader())

    history = _history(log)
    assert [r.step for r in history.records] == [0, 1, 2, 3]
    for record in history.records:
        assert record.micro_batches == 2
        # both micro-batches' gradients, summed: the norm the optimiser step applies
        assert record.total_norm == pytest.approx(module.norms[record.step], rel=1e-4)
        # the loss Lightning backpropagates: each micro-batch's divided by 2, summed
        first, second = module.losses[2 * record.step : 2 * record.step + 2]
        assert record.loss == pytest.approx((first + second) / 2, rel=1e-5)
        assert all(len(layer.calls) == 1 for layer in record.layers)  # the two micro-batches folded into one


@pytest.mark.slow
def test_lightning_grad_scaler_numbers_read_unscaled(tmp_path: Path) -> None:
    """fp16 autocast with a GradScaler, on CPU: Lightning picks bf16 for ``precision="16-mixed"`` there, so
    the plugin is given a CPU scaler explicitly; the same code path as on a GPU."""
    from lightning.pytorch.plugins import MixedPrecision

    from gradcheck_cli.integrations.lightning import GradcheckCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckCallback(every=1, log=log)
    module = _module()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = _trainer(tmp_path, callback, max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, _loader())

    history = _history(log)
    assert history.header.scaler
    assert [r.step for r in history.records] == [0, 1, 2]
    for record in history.records:
        assert record.scale == 1024.0
        # the model's own hook sees the gradients after Lightning's unscale_; the loss as training_step returned it
        assert record.total_norm == pytest.approx(module.norms[record.step], rel=1e-4)
        assert record.loss == pytest.approx(module.losses[record.step], rel=1e-5)


def _diverging(lr: float = 5.0) -> Any:
    module = _module(lr=lr)
    with torch.no_grad():
        module.net[4].weight.mul_(20.0)
    return module


@pytest.mark.slow
def test_lightning_stop_ends_fit_at_the_first_bad_record(tmp_path: Path) -> None:
    from gradcheck_cli.integrations.lightning import GradcheckCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckCallback(every=1, log=log, on_problem="stop")
    module = _diverging()
    trainer = _trainer(tmp_path, callback, max_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(batch_size=4, n=256))

    history = _history(log)
    last = history.records[-1]
    assert [r.step for r in history.records] == list(range(last.step + 1))
    assert set(history.verdicts[-1]["problems"]) & STOPPING
    assert not any(set(v["problems"]) & STOPPING for v in history.verdicts[:-1])
    assert trainer.global_step == last.step + 1  # the step under way completed, then fit returned
    assert trainer.global_step < 40
    assert trainer.state.status == "finished" and not trainer.interrupted
    assert callback.watch is not None and callback.watch.should_stop
    _no_hooks_left(module)


@pytest.mark.slow
def test_lightning_raise_leaves_fit_and_removes_hooks(tmp_path: Path) -> None:
    from gradcheck_cli.integrations.lightning import GradcheckCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckCallback(every=1, log=log, on_problem="raise")
    module = _diverging()
    trainer = _trainer(tmp_path, callback, max_steps=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(GradientProblemError) as caught:
            trainer.fit(module, _loader(batch_size=4, n=256))

    history = _history(log)
    assert history.records[-1].step == caught.value.assessment.step
    assert set(history.verdicts[-1]["problems"]) & STOPPING
    _no_hooks_left(module)


# ---------------------------------------------------------------------- Hugging Face


class TokenDataset(Dataset[dict[str, torch.Tensor]]):
    """Random token sequences, labelled with themselves (causal LM)."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 100) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2(tied: bool = True) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    return transformers.GPT2LMHeadModel(config)


def _hf_train(tmp_path: Path, callback: Any, model: nn.Module | None = None, data: Any = None, **kwargs: Any) -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if model is None:
        model = _gpt2(tied=False)
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    optimizers = kwargs.pop("optimizers", (None, None))
    options.update(kwargs)
    args = transformers.TrainingArguments(**options)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset() if data is None else data,
        callbacks=[callback],
        optimizers=optimizers,
    )
    trainer.train()
    return trainer


def _logged(trainer: Any, key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


GPT2_LAYERS = {
    "transformer.wte",
    "transformer.wpe",
    "transformer.h.0.ln_1",
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.0.mlp.c_fc",
    "transformer.h.1.mlp.c_proj",
    "transformer.ln_f",
    "lm_head",
}


@pytest.mark.slow
def test_hf_trainer_writes_history_at_logged_steps(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckTrainerCallback(every=2, log=log)
    trainer = _hf_train(tmp_path, callback)

    history = _history(log)
    assert history.header.model == "GPT2LMHeadModel"
    # numbered as the Trainer logs: the value of global_step after the step (1-based)
    assert [r.step for r in history.records] == [2, 4, 6]
    grad_norm, loss = _logged(trainer, "grad_norm"), _logged(trainer, "loss")
    for record, verdict in zip(history.records, history.verdicts, strict=True):
        names = {layer.name for layer in record.layers}
        assert names >= GPT2_LAYERS
        assert not any(name.startswith(("module.", "_orig_mod.")) for name in names)
        assert record.micro_batches == 1
        assert record.total_norm == pytest.approx(grad_norm[record.step], rel=1e-3)
        assert record.loss == pytest.approx(loss[record.step], abs=1e-3)
        assert verdict == {"status": "healthy", "problems": []}
    _no_hooks_left(trainer.model)


@pytest.mark.slow
def test_hf_trainer_gradient_accumulation_and_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckTrainerCallback(every=2, log=log)
    trainer = _hf_train(
        tmp_path,
        callback,
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        report_to=["tensorboard"],
    )

    history = _history(log)
    assert [r.step for r in history.records] == [2, 4]
    grad_norm, loss = _logged(trainer, "grad_norm"), _logged(trainer, "loss")
    for record in history.records:
        assert record.micro_batches == 2
        assert record.total_norm == pytest.approx(grad_norm[record.step], rel=1e-3)
        assert record.loss == pytest.approx(loss[record.step], abs=1e-3)

    events = EventAccumulator(str(tmp_path / "out" / "runs" / "gradcheck"))
    events.Reload()
    totals = events.Scalars("gradcheck/total_norm")
    assert [e.step for e in totals] == [2, 4]
    assert [e.value for e in totals] == pytest.approx([r.total_norm for r in history.records], rel=1e-5)
    assert "gradcheck/problems" in events.Tags()["scalars"]


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])  # tied: wte and lm_head share one weight
def test_hf_recorded_norm_is_the_unclipped_one(tmp_path: Path, tied: bool) -> None:
    pytest.importorskip("transformers")
    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckTrainerCallback(every=1, log=log)
    trainer = _hf_train(tmp_path, callback, model=_gpt2(tied), max_steps=3, max_grad_norm=1e-6)

    history = _history(log)
    assert [r.step for r in history.records] == [1, 2, 3]
    grad_norm = _logged(trainer, "grad_norm")  # the Trainer logs the norm clip_grad_norm_ returns: before clipping
    for record in history.records:
        assert record.total_norm > 1e-3
        assert record.total_norm == pytest.approx(grad_norm[record.step], rel=1e-3)


class Regressor(nn.Module):
    """A plain torch model for the Trainer whose forward turns Inf at its ``bad``-th training call."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.bad = bad
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        out = self.net(x)
        if self.calls == self.bad:
            out = out * math.inf
        return {"loss": F.mse_loss(out, y)}


class PairDataset(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.data = _regression()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.data[i]
        return {"x": x, "y": y}


@pytest.mark.slow
def test_hf_stop_ends_training_cleanly(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckTrainerCallback(every=1, log=log, on_problem="stop")
    model = Regressor(bad=5)  # micro-batch 5: the first of step 3
    trainer = _hf_train(
        tmp_path, callback, model=model, data=PairDataset(), learning_rate=1e-3, gradient_accumulation_steps=2
    )

    history = _history(log)
    assert [r.step for r in history.records] == [1, 2, 3]
    assert [r.micro_batches for r in history.records] == [2, 2, 2]
    assert [v["status"] for v in history.verdicts[:2]] == ["healthy", "healthy"]
    assert "non_finite" in history.verdicts[-1]["problems"]
    # a model given no num_items_in_batch: the mean of the micro-batches' losses, as the Trainer logs it
    loss = _logged(trainer, "loss")
    for record in history.records[:2]:
        assert record.loss == pytest.approx(loss[record.step], abs=1e-3)
    assert trainer.state.global_step == 3  # stopped after step 3 of 6
    _no_hooks_left(model)


@pytest.mark.slow
def test_hf_raise_leaves_train_and_removes_hooks(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback

    log = tmp_path / "grads.jsonl"
    callback = GradcheckTrainerCallback(every=1, log=log, on_problem="raise")
    model = Regressor(bad=2)
    with pytest.raises(GradientProblemError) as caught:
        _hf_train(tmp_path, callback, model=model, data=PairDataset(), learning_rate=1e-3)

    assert caught.value.assessment.step == 2
    history = _history(log)
    assert [r.step for r in history.records] == [1, 2]
    assert "non_finite" in history.verdicts[-1]["problems"]
    _no_hooks_left(model)


# ---------------------------------------------------------------------- imports


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_importing_gradcheck_imports_no_framework() -> None:
    proc = _python(
        "import sys\n"
        "import gradcheck_cli, gradcheck_cli.training.monitor, gradcheck_cli.integrations\n"
        "heavy = {'lightning', 'pytorch_lightning', 'transformers', 'accelerate', 'tensorboard', 'wandb'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_missing_lightning_names_the_extra() -> None:
    proc = _python(
        "import sys\n"
        "sys.modules['lightning'] = sys.modules['lightning.pytorch'] = sys.modules['pytorch_lightning'] = None\n"
        "import gradcheck_cli.integrations.lightning\n"
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "pip install gradcheck[lightning]" in proc.stderr


def test_bad_arguments_fail_at_construction() -> None:
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("transformers")
    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback
    from gradcheck_cli.integrations.lightning import GradcheckCallback

    for make in (GradcheckCallback, GradcheckTrainerCallback):
        with pytest.raises(ValueError, match="on_problem"):
            make(on_problem="explode")
        with pytest.raises(ValueError, match="every"):
            make(every=0)


# ------------------------------------------------------------------ divergence mid-training: the onset step


def _jump(step_at: int, factor: float) -> Any:
    """LambdaLR factor: 1 until the optimiser step ``step_at`` (0-based), ``factor`` from it on."""
    return lambda s: 1.0 if s < step_at else factor


@pytest.mark.slow
def test_lightning_divergence_mid_training_is_dated_at_the_first_step_it_touched(tmp_path: Path) -> None:
    from gradcheck_cli.integrations.lightning import GradcheckCallback

    module = _module(lr=0.05)

    def configure_optimizers() -> Any:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _jump(10, 400.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    module.configure_optimizers = configure_optimizers
    log = tmp_path / "grads.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, GradcheckCallback(every=1, log=log), max_steps=25).fit(module, _loader())
    report = history_report(log)
    assert report.history is not None and report.history.records == 25
    onset = report.history.onsets[0]
    # optimiser step 10 is the first with the large rate; step 11's gradient is the first it changed
    assert onset.problem in ("exploding", "non_finite")
    assert (onset.step, onset.last_healthy_step) == (11, 10)


@pytest.mark.slow
def test_hf_divergence_mid_training_is_dated_at_the_first_step_it_touched(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback

    model = _gpt2(tied=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _jump(8, 1000.0))
    log = tmp_path / "grads.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _hf_train(
            tmp_path, GradcheckTrainerCallback(every=1, log=log), model=model, max_steps=20,
            optimizers=(optimizer, scheduler),
        )  # fmt: skip
    report = history_report(log)
    assert report.history is not None and report.history.records == 20
    assert not report.healthy
    onset = report.history.onsets[0]
    # the Trainer numbers optimiser step k (0-based) as k + 1: step 9 is the first with the large rate, and
    # step 10's gradient the first it changed; Adam's normalised steps may show it in the loss a step later
    assert onset.problem in ("exploding", "non_finite")
    assert onset.last_healthy_step is not None and onset.last_healthy_step >= 9
    assert 10 <= onset.step <= 12, report.history.onsets
