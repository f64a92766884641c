"""A tiny gradual-unfreezing run on the tiny BERT, shared by the in-process tests and the DDP script.

``python tests/helpers/unfreeze_run.py BERT_DIR OUT.json`` (with the repository root on ``PYTHONPATH``) runs it under DDP on 2 CPU processes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from finetune.callbacks.unfreeze import GradualUnfreezing  # noqa: E402
from finetune.optim import OptimizerConfig  # noqa: E402
from finetune.tasks import ClassificationTask  # noqa: E402

LABELS = ["a", "b", "c"]
BLOCKS = {
    "embeddings": "model.bert.embeddings.",
    "layer.0": "model.bert.encoder.layer.0.",
    "layer.1": "model.bert.encoder.layer.1.",
    "head": ("model.bert.pooler.", "model.classifier."),
}


def block_of(name: str) -> str:
    return next(block for block, prefix in BLOCKS.items() if name.startswith(prefix))


def dataset(bert_dir, count: int = 32) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    words = ["good movie", "bad day very", "okay food", "great fine day", "awful poor movie not"]
    encoded = tokenizer(
        [words[i % 5] for i in range(count)], padding="max_length", max_length=8, return_tensors="pt"
    )
    return [{k: v[i] for k, v in encoded.items()} | {"labels": torch.tensor(i % 3)} for i in range(count)]


def task(bert_dir) -> ClassificationTask:
    torch.manual_seed(0)
    config = OptimizerConfig(lr=0.01, weight_decay=0.1, layer_decay=0.5)
    return ClassificationTask(str(bert_dir), strategy="full", labels=LABELS, optimizer=config)


class Changes(pl.Callback):
    """Per optimizer step: which blocks moved (any parameter not bitwise equal), and the LR of each block."""

    def __init__(self) -> None:
        self.changed: list[list[str]] = []
        self.lrs: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.lrs.append({g["block"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = {block_of(n) for n, p in pl_module.named_parameters() if not torch.equal(p, self.before[n])}
        self.changed.append(sorted(moved))


def trainer(max_steps: int, callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(callbacks=callbacks, **(options | kwargs))


if __name__ == "__main__":
    bert_dir, out = sys.argv[1], sys.argv[2]
    changes = Changes()
    unfreezing = GradualUnfreezing(milestones=[1, 2, 3], interval="step")
    fit = trainer(4, [unfreezing, changes], devices=2, strategy="ddp")
    model = task(bert_dir)
    fit.fit(model, DataLoader(dataset(bert_dir), batch_size=4))
    state = {
        "rank": fit.global_rank,
        "changed": changes.changed,
        "lrs": changes.lrs,
        "opened": unfreezing.opened,
        "trainable": sorted({block_of(n) for n, p in model.named_parameters() if p.requires_grad}),
    }
    with open(f"{out}.{fit.global_rank}", "w") as f:
        json.dump(state, f)
