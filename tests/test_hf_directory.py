"""End-to-end tests of ``gradcheck inspect`` on Hugging Face ``save_pretrained`` directories.

Each directory is written by ``save_pretrained`` from a tiny config like those of ``tests/zoo.py`` (some
then edited or broken on purpose), and the real command line runs on it as ``python -m gradcheck_cli``
in a subprocess. All runs are made once by module-scoped fixtures, in parallel (one per CPU), because
each subprocess spends most of its time importing torch and transformers.

transformers 5 writes safetensors only (``safe_serialization=False`` is gone); the ``pytorch_model.bin``
form that transformers 4 wrote is then produced here from the same tensors (:func:`save_bin`).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import cli_models
from cli_support import Proc, assert_one_line_error, hashes, run_many, show

pytest.importorskip("transformers")

from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from gradcheck_cli.errors import CheckpointError
from gradcheck_cli.load.hf_dir import load_hf_directory

SAVE_SEED = 1234
"""Seed of the saved weights; the CLI builds its model unseeded, so only loaded weights match the files."""
SHARD_SIZE = "50KB"


# --------------------------------------------------------------------------- helpers


def healthy_report(proc: Proc) -> dict[str, Any]:
    """The JSON report of a run that exited 0 with a healthy verdict, loaded as a Hugging Face directory."""
    assert proc.returncode == 0, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    report = json.loads(proc.stdout)
    assert report["status"] == "healthy", show(proc)
    assert report["problems"] == []
    assert report["run"]["checkpoint_kind"] == "huggingface"
    assert report["layers"]
    assert all(layer["grad_norm"] and layer["grad_norm"] > 0 for layer in report["layers"]), show(proc)
    return report


def weight_norm(report: dict[str, Any], layer: str) -> float:
    return next(entry["weight_norm"] for entry in report["layers"] if entry["name"] == layer)


def norm(*tensors: torch.Tensor) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def edit_config(directory: Path, **changes: Any) -> None:
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config, indent=2))


def save_bin(model: PreTrainedModel, directory: Path, **kwargs: Any) -> None:
    """``save_pretrained(safe_serialization=False)``: ``pytorch_model.bin`` (or its shards and index).

    transformers 5 ignores the flag and writes safetensors; the files transformers 4 wrote are then made
    from the same tensors: one ``torch.save`` of the state_dict (tied tensors under both names), or one
    ``torch.save`` per shard with a ``pytorch_model.bin.index.json``.
    """
    model.save_pretrained(directory, safe_serialization=False, **kwargs)
    if (directory / "pytorch_model.bin").exists() or (directory / "pytorch_model.bin.index.json").exists():
        return
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
        (directory / "model.safetensors").unlink()
        return
    data = json.loads(index.read_text())
    renamed = {}
    for shard in dict.fromkeys(data["weight_map"].values()):
        renamed[shard] = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(directory / shard), directory / renamed[shard])
        (directory / shard).unlink()
    data["weight_map"] = {key: renamed[shard] for key, shard in data["weight_map"].items()}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2))
    index.unlink()


# --------------------------------------------------------------------------- tiny models (configs of tests/zoo.py)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(SAVE_SEED)
    config = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_positions=64, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def bert_config() -> BertConfig:
    return BertConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=1000
    )


def bert_classifier() -> BertForSequenceClassification:
    torch.manual_seed(SAVE_SEED)
    return BertForSequenceClassification(bert_config())


def bert_base() -> BertModel:
    torch.manual_seed(SAVE_SEED)
    return BertModel(bert_config())


def vit() -> ViTForImageClassification:
    torch.manual_seed(SAVE_SEED)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=10,
    )
    return ViTForImageClassification(config)


CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).touch()
"""


# --------------------------------------------------------------------------- the directories and the runs


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every directory written, every CLI run made (in parallel), and the file hashes before and after."""
    work = tmp_path_factory.mktemp("hf")
    markers_dir = tmp_path_factory.mktemp("markers")
    markers = {name: markers_dir / f"pwned_{name}" for name in ("evil", "evil_trusted", "custom")}

    model = gpt2()
    model.save_pretrained(work / "gpt2_safetensors")
    save_bin(model, work / "gpt2_bin")
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(7))
    torch.save({"input_ids": ids, "labels": ids}, work / "batch.pt")

    bert_classifier().save_pretrained(work / "bert_sharded", max_shard_size=SHARD_SIZE)
    save_bin(vit(), work / "vit_bin_sharded", max_shard_size=SHARD_SIZE)

    shutil.copytree(work / "bert_sharded", work / "bert_head_as_base")
    edit_config(work / "bert_head_as_base", architectures=["BertModel"])
    bert_base().save_pretrained(work / "bert_base_as_head")
    edit_config(work / "bert_base_as_head", architectures=["BertForSequenceClassification"])

    (work / "no_weights").mkdir()
    shutil.copy(work / "gpt2_safetensors" / "config.json", work / "no_weights" / "config.json")
    shutil.copytree(work / "gpt2_safetensors", work / "wider")
    edit_config(work / "wider", n_embd=96)
    shutil.copytree(work / "gpt2_safetensors", work / "unknown_arch")
    edit_config(work / "unknown_arch", architectures=["GPT2NoSuchHeadModel"])
    (work / "no_config").mkdir()
    shutil.copy(work / "gpt2_safetensors" / "model.safetensors", work / "no_config" / "model.safetensors")
    for name in ("evil", "evil_trusted"):
        (work / name).mkdir()
        shutil.copy(work / "gpt2_safetensors" / "config.json", work / name / "config.json")
        payload = cli_models.MaliciousPayload(f"touch {shlex.quote(str(markers[name]))}")
        torch.save(payload, work / name / "pytorch_model.bin")
    custom = work / "custom_code"
    shutil.copytree(work / "gpt2_safetensors", custom)
    edit_config(
        custom,
        model_type="gradcheck_custom",
        architectures=["CustomNetForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomNetConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomNetForCausalLM",
        },
    )
    for module in ("configuration_custom", "modeling_custom"):
        (custom / f"{module}.py").write_text(CUSTOM_CODE.format(marker=str(markers["custom"])))

    before = hashes(work)
    runs = run_many(
        {
            "gpt2_safetensors": ["inspect", "gpt2_safetensors", "--format", "json"],
            "gpt2_safetensors_batch": ["inspect", "gpt2_safetensors", "--input", "batch.pt", "--format", "json"],
            "gpt2_bin": ["inspect", "gpt2_bin", "--format", "json"],
            "gpt2_bin_batch": ["inspect", "gpt2_bin", "--input", "batch.pt", "--format", "json"],
            "bert_sharded": ["inspect", "bert_sharded", "--format", "json"],
            "vit_bin_sharded": ["inspect", "vit_bin_sharded", "--format", "json"],
            "no_weights": ["inspect", "no_weights", "--format", "json"],
            "wider": ["inspect", "wider", "--format", "json"],
            "unknown_arch": ["inspect", "unknown_arch", "--format", "json"],
            "no_config": ["inspect", "no_config", "--format", "json"],
            "evil": ["inspect", "evil", "--format", "json"],
            "custom_code": ["inspect", "custom_code", "--format", "json"],
        },
        cwd=work,
    )
    return {"dir": work, "before": before, "after": hashes(work), "markers": markers, **runs}


# --------------------------------------------------------------------------- GPT-2: tied LM head, both file forms

GPT2_FORMS = {"gpt2_safetensors": "model.safetensors", "gpt2_bin": "pytorch_model.bin"}


def saved_gpt2_tensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("form", list(GPT2_FORMS))
def test_gpt2_directory_loads_the_saved_weights_and_infers_a_batch_from_the_config(
    hf: dict[str, Any], form: str
) -> None:
    report = healthy_report(hf[form])
    run = report["run"]
    assert run["model_type"] == "GPT2LMHeadModel"
    assert "Hugging Face config" in run["batch_source"], run
    assert run["batch"] == "input_ids=int64[2, 16]"
    saved = saved_gpt2_tensors(hf["dir"] / form)
    fc = "transformer.h.0.mlp.c_fc"
    assert weight_norm(report, fc) == pytest.approx(norm(saved[f"{fc}.weight"], saved[f"{fc}.bias"]), rel=1e-5)
    # the LM head is tied to the token embedding: it carries the saved embedding, stored once or twice
    assert weight_norm(report, "lm_head") == pytest.approx(norm(saved["transformer.wte.weight"]), rel=1e-5)
    notes = " | ".join(report["notes"])
    assert "GPT2LMHeadModel built from config.json" in notes
    assert GPT2_FORMS[form] in notes
    if form == "gpt2_safetensors":  # safetensors drops the shared tensor: it is tied, not missing
        assert "lm_head.weight" not in saved
        assert "lm_head.weight = transformer.wte.weight" in notes


@pytest.mark.parametrize("form", list(GPT2_FORMS))
def test_gpt2_directory_with_a_dict_batch_uses_the_models_own_loss(hf: dict[str, Any], form: str) -> None:
    report = healthy_report(hf[f"{form}_batch"])
    assert report["run"]["loss_kind"] == "model"
    assert report["run"]["batch_source"] == "--input batch.pt"


# --------------------------------------------------------------------------- sharded BERT and ViT


def test_sharded_safetensors_bert_classifier_is_healthy(hf: dict[str, Any]) -> None:
    assert len(list((hf["dir"] / "bert_sharded").glob("model-*.safetensors"))) > 1
    report = healthy_report(hf["bert_sharded"])
    assert report["run"]["model_type"] == "BertForSequenceClassification"
    assert any("shard(s) listed in model.safetensors.index.json" in n for n in report["notes"])
    saved = load_file(next((hf["dir"] / "bert_sharded").glob("model-*-of-*.safetensors")))
    key = next(k for k in saved if k.endswith("query.weight"))
    layer = key.removesuffix(".weight")
    tensors = load_all_safetensors(hf["dir"] / "bert_sharded")
    assert weight_norm(report, layer) == pytest.approx(norm(tensors[key], tensors[f"{layer}.bias"]), rel=1e-5)


def load_all_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_sharded_pytorch_bin_vit_classifier_is_healthy(hf: dict[str, Any]) -> None:
    assert len(list((hf["dir"] / "vit_bin_sharded").glob("pytorch_model-*.bin"))) > 1
    report = healthy_report(hf["vit_bin_sharded"])
    assert report["run"]["model_type"] == "ViTForImageClassification"
    assert report["run"]["batch"] == "pixel_values=float32[2, 3, 32, 32]"
    assert any("shard(s) listed in pytorch_model.bin.index.json" in n for n in report["notes"])


# --------------------------------------------------------------------------- base-model prefix


# (in process: the loader alone decides these, and a CLI run costs seconds of imports)


def test_task_model_weights_load_into_the_base_model_ignoring_the_head(hf: dict[str, Any]) -> None:
    """``architectures: [BertModel]`` over a classifier's weights: ``bert.`` stripped, as from_pretrained does."""
    directory = hf["dir"] / "bert_head_as_base"
    loaded = load_hf_directory(directory, trust=False)
    assert type(loaded.module).__name__ == "BertModel"
    assert loaded.kind == "huggingface"
    notes = " | ".join(loaded.notes)
    assert "stripped the base-model prefix" in notes
    assert "classifier.weight" in notes
    saved = load_all_safetensors(directory)
    own = loaded.module.state_dict()
    assert torch.equal(own["pooler.dense.weight"], saved["bert.pooler.dense.weight"])
    assert torch.equal(own["embeddings.word_embeddings.weight"], saved["bert.embeddings.word_embeddings.weight"])


def test_base_model_weights_refused_for_a_task_model_naming_the_random_head(hf: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError) as caught:
        load_hf_directory(hf["dir"] / "bert_base_as_head", trust=False)
    line = str(caught.value)
    assert "\n" not in line
    for needle in ("bert_base_as_head", "BertForSequenceClassification", "classifier.weight", "random head"):
        assert needle in line


# --------------------------------------------------------------------------- directories that cannot be used


def test_directory_without_weights_refused_naming_the_files_looked_for(hf: dict[str, Any]) -> None:
    assert_one_line_error(
        hf["no_weights"],
        "no weights in no_weights",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )


def test_weights_of_another_width_refused_naming_the_shape_mismatch(hf: dict[str, Any]) -> None:
    assert_one_line_error(
        hf["wider"], "wider", "shape mismatch at transformer.wte.weight", "checkpoint [1000, 64]", "model [1000, 96]"
    )


def test_unknown_architecture_refused_naming_it(hf: dict[str, Any]) -> None:
    assert_one_line_error(hf["unknown_arch"], "GPT2NoSuchHeadModel", "architectures")


def test_directory_without_config_json_refused(hf: dict[str, Any]) -> None:
    assert_one_line_error(hf["no_config"], "no_config is a directory without config.json", "save_pretrained")


def test_malicious_pytorch_bin_refused_without_trust_and_not_executed(hf: dict[str, Any]) -> None:
    line = assert_one_line_error(hf["evil"], "pytorch_model.bin", "would import and run code", "--trust")
    assert "system" in line
    assert not hf["markers"]["evil"].exists(), "the pickle's payload ran without --trust"


def test_malicious_pytorch_bin_payload_is_live_with_trust(hf: dict[str, Any]) -> None:
    """Control: with --trust the payload does run, so the refusal above is what kept it from running."""
    with pytest.raises(CheckpointError, match="not a dict of named tensors"):
        load_hf_directory(hf["dir"] / "evil_trusted", trust=True)
    assert hf["markers"]["evil_trusted"].exists()


def test_custom_code_directory_refused_naming_the_class(hf: dict[str, Any]) -> None:
    assert_one_line_error(hf["custom_code"], "custom model code", "CustomNetForCausalLM", "--model module:factory")
    assert not hf["markers"]["custom"].exists(), "code from the model directory was imported"


def test_custom_code_directory_refused_even_with_trust(hf: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError, match="not even with --trust"):
        load_hf_directory(hf["dir"] / "custom_code", trust=True)
    assert not hf["markers"]["custom"].exists(), "code from the model directory was imported"


def test_no_file_in_the_directories_changes(hf: dict[str, Any]) -> None:
    assert hf["after"] == hf["before"]


# --------------------------------------------------------------------------- without transformers


def test_missing_transformers_asks_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "transformers", None)  # ``import transformers`` now fails
    with pytest.raises(CheckpointError, match="pip install transformers"):
        load_hf_directory(tmp_path, trust=False)


# --------------------------------------------------------------------------- more loader rules, in process


@pytest.fixture(scope="module")
def gpt2_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in gpt2().state_dict().items()}


def gpt2_directory(directory: Path, state: Mapping[str, torch.Tensor], **config_changes: Any) -> Path:
    """A GPT-2 directory whose ``pytorch_model.bin`` holds ``state`` (config from a real save_pretrained)."""
    gpt2().config.save_pretrained(directory)
    edit_config(directory, **{"architectures": ["GPT2LMHeadModel"], **config_changes})
    torch.save(dict(state), directory / "pytorch_model.bin")
    return directory


def test_tied_tensors_stored_with_different_values_refused(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    untied = {**gpt2_state, "lm_head.weight": gpt2_state["transformer.wte.weight"] + 1}
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_hf_directory(gpt2_directory(tmp_path, untied), trust=False)


def test_missing_weight_that_is_not_tied_refused(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    partial = {k: v for k, v in gpt2_state.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \(first: transformer.h.1.mlp.c_fc.weight\)"):
        load_hf_directory(gpt2_directory(tmp_path, partial), trust=False)


def test_untied_config_needs_the_lm_head_stored(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    without_head = {k: v for k, v in gpt2_state.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match=r"first: lm_head\.weight"):
        load_hf_directory(gpt2_directory(tmp_path, without_head, tie_word_embeddings=False), trust=False)


def test_unexpected_weight_refused(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    extra = {**gpt2_state, "transformer.h.9.mlp.c_fc.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="1 unexpected key"):
        load_hf_directory(gpt2_directory(tmp_path, extra), trust=False)


def test_stored_buffers_the_model_recomputes_are_ignored(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    """Old GPT-2 checkpoints carry ``attn.bias`` causal masks, now rebuilt by the model (as from_pretrained)."""
    old = {**gpt2_state, "transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64)}
    loaded = load_hf_directory(gpt2_directory(tmp_path, old), trust=False)
    assert any("transformer.h.0.attn.bias" in note for note in loaded.notes)


def test_safetensors_preferred_over_pytorch_bin(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    directory = gpt2_directory(tmp_path, {k: v + 1 for k, v in gpt2_state.items()})
    gpt2().save_pretrained(directory)
    loaded = load_hf_directory(directory, trust=False)
    assert torch.equal(loaded.module.state_dict()["transformer.wpe.weight"], gpt2_state["transformer.wpe.weight"])
    assert any("model.safetensors (pytorch_model.bin not read)" in note for note in loaded.notes)


def test_shard_missing_from_the_directory_refused(hf: dict[str, Any], tmp_path: Path) -> None:
    directory = tmp_path / "bert"
    shutil.copytree(hf["dir"] / "bert_sharded", directory)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard.name}, which is missing"):
        load_hf_directory(directory, trust=False)


def test_shard_index_pointing_outside_the_directory_refused(hf: dict[str, Any], tmp_path: Path) -> None:
    directory = tmp_path / "bert"
    shutil.copytree(hf["dir"] / "bert_sharded", directory)
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a file name inside"):
        load_hf_directory(directory, trust=False)


def test_quantized_model_refused(tmp_path: Path, gpt2_state: dict[str, torch.Tensor]) -> None:
    directory = gpt2_directory(tmp_path, gpt2_state, quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(CheckpointError, match=r"quantized model .* bitsandbytes"):
        load_hf_directory(directory, trust=False)


def test_auto_map_over_a_builtin_model_uses_the_builtin_class(
    tmp_path: Path, gpt2_state: dict[str, torch.Tensor]
) -> None:
    """As from_pretrained(trust_remote_code=False): the directory's code is not imported, the built-in class is."""
    marker = tmp_path / "imported"
    directory = gpt2_directory(
        tmp_path / "gpt2", gpt2_state, auto_map={"AutoModelForCausalLM": "modeling_gpt2_custom.GPT2LMHeadModel"}
    )
    (directory / "modeling_gpt2_custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    loaded = load_hf_directory(directory, trust=False)
    assert type(loaded.module).__module__.startswith("transformers.")
    assert any("auto_map" in note for note in loaded.notes)
    assert not marker.exists()
