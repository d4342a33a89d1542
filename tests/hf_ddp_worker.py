"""A Hugging Face Trainer run under torchrun (DDP over gloo, 2 CPU ranks) with GradcheckTrainerCallback and heavy
clipping: ``python -m torch.distributed.run --nproc-per-node 2 hf_ddp_worker.py OUT``. Process zero writes the
history (OUT/grads.jsonl) and the grad_norm values the Trainer logged (OUT/logged.json)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from gradcheck_cli.integrations.huggingface import GradcheckTrainerCallback


class Tokens(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (32, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    warnings.simplefilter("ignore")
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_grad_norm=1e-6, ddp_backend="gloo",
    )  # fmt: skip
    callback = GradcheckTrainerCallback(every=1, log=out / "grads.jsonl")
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    if trainer.is_world_process_zero():
        logged = {e["step"]: e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e}
        (out / "logged.json").write_text(json.dumps(logged))


if __name__ == "__main__":
    main()
    # as in dist_worker.py: gloo in torch 2.13 can abort a rank during interpreter teardown after all work is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
