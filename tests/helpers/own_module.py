"""Plain LightningModules around a tiny timm and a tiny Hugging Face model, as a user writes them (no finetune
task), and what the tests of finetune's callbacks on them record.

``python tests/helpers/own_module.py OUT.json`` (repository root on ``PYTHONPATH``) runs gradual unfreezing
on the timm module under DDP on 2 CPU processes and writes ``OUT.json.<rank>``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from finetune.callbacks.unfreeze import GradualUnfreezing  # noqa: E402
from finetune.tasks.loss_terms import LossTermsMixin  # noqa: E402

LR, WEIGHT_DECAY = 0.01, 0.1
# Blocks by parameter-name prefix, written out by hand (what the layout discovery must find), top-down.
BLOCKS = {
    "timm": {
        "head": ("net.fc.",),
        "net.layer4": ("net.layer4.",),
        "net.layer3": ("net.layer3.",),
        "net.layer2": ("net.layer2.",),
        "net.layer1": ("net.layer1.",),
        "embeddings": ("net.conv1.", "net.bn1."),
    },
    "hf": {
        "head": ("net.bert.pooler.", "net.classifier."),
        "net.bert.encoder.layer.1": ("net.bert.encoder.layer.1.",),
        "net.bert.encoder.layer.0": ("net.bert.encoder.layer.0.",),
        "embeddings": ("net.bert.embeddings.",),
    },
}


def block_of(kind: str, name: str) -> str:
    return next(block for block, prefixes in BLOCKS[kind].items() if name.startswith(prefixes))


def tiny_network(kind: str) -> torch.nn.Module:
    """timm's ``test_resnet`` (BatchNorm included) or a 2-layer, 32-wide BERT without dropout, 3 classes."""
    torch.manual_seed(0)
    if kind == "timm":
        import timm

        return timm.create_model("test_resnet", pretrained=False, num_classes=3)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def logits_of(net: torch.nn.Module, batch: dict) -> torch.Tensor:
    if "pixel_values" in batch:
        return net(batch["pixel_values"])
    return net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class Plain(pl.LightningModule):
    """The user's module: ``self.net``, cross-entropy, and ``AdamW(self.parameters())``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = tiny_network(kind)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(logits_of(self.net, batch), batch["labels"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


class Student(LossTermsMixin, pl.LightningModule):
    """The user's module with the one change distillation needs; keeps each step's logits and loss."""

    def __init__(self, kind: str, labels: list[str] | None = None) -> None:
        super().__init__()
        self.net = tiny_network(kind)
        if labels is not None:
            self.labels = labels
        self.steps: list[dict] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = logits_of(self.net, batch)
        loss = F.cross_entropy(logits, batch["labels"])
        total = self.total_loss(logits=logits, batch=batch, task_loss=loss)
        self.steps.append({"logits": logits.detach(), "task_loss": loss.detach(), "total": total.detach()})
        return total

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def rows(kind: str, count: int = 16, vocab: int = 40, size: int = 32) -> list[dict]:
    """Fixed random inputs: ``size``² images or 8-token sentences (the last two padded), labels ``i % 3``."""
    generator = torch.Generator().manual_seed(1)
    if kind == "timm":
        pixels = torch.randn(count, 3, size, size, generator=generator)
        return [{"pixel_values": pixels[i], "labels": torch.tensor(i % 3)} for i in range(count)]
    ids = torch.randint(5, vocab, (count, 8), generator=generator)
    mask = torch.ones(count, 8, dtype=torch.long)
    mask[:, 6:] = 0
    return [
        {"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)} for i in range(count)
    ]


def loader(kind: str, count: int = 16, batch_size: int = 4, size: int = 32) -> DataLoader:
    return DataLoader(rows(kind, count, size=size), batch_size=batch_size)


class Changes(pl.Callback):
    """Per optimizer step: which blocks' parameters moved (any not bitwise equal), and which blocks' buffers
    (BatchNorm running statistics) moved."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.changed: list[list[str]] = []
        self.buffers_moved: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.buffers = {n: b.clone() for n, b in pl_module.named_buffers()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = {n for n, p in pl_module.named_parameters() if not torch.equal(p, self.before[n])}
        self.changed.append(sorted({block_of(self.kind, n) for n in moved}))
        buffers = {n for n, b in pl_module.named_buffers() if not torch.equal(b, self.buffers[n])}
        self.buffers_moved.append(sorted({block_of(self.kind, n) for n in buffers}))


def trainer(callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(callbacks=callbacks, **(options | kwargs))


def expected_changed(kind: str, steps: int) -> list[list[str]]:
    """With one block opening per step, top-down: the blocks that move at each step."""
    order = list(BLOCKS[kind])
    return [sorted(order[: step + 1]) for step in range(steps)]


if __name__ == "__main__":
    out = sys.argv[1]
    changes = Changes("timm")
    unfreezing = GradualUnfreezing(every=1, interval="step")
    fit = trainer([unfreezing, changes], devices=2, strategy="ddp", max_steps=6)
    module = Plain("timm")
    fit.fit(module, loader("timm", count=48, batch_size=4))
    state = {
        "changed": changes.changed,
        "opened": unfreezing.opened,
        "requires_grad": all(p.requires_grad for p in module.parameters()),
        "weights": {n: p.detach().double().sum().item() for n, p in module.named_parameters()},
        "groups": len(fit.optimizers[0].param_groups),
    }
    with open(f"{out}.{fit.global_rank}", "w") as f:
        json.dump(state, f)
