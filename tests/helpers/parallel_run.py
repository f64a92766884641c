"""Tiny fine-tuning runs for the sharding tests, the same in one process and under torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers/parallel_run.py CASES.json``
(repository root on ``PYTHONPATH``) runs every case of CASES.json with ``FSDP2Strategy(**case["fsdp2"])`` on
2 CPU processes (a case: ``kind`` hf | timm | causal_lm, ``backbone``, ``vocab``, ``strategy``, ``batch``
(global), ``devices``, ``root``, ``out``; optional ``unfreeze``, ``teacher``, ``epochs``, ``checkpoints``,
``resume``, ``fsdp2``); the tests call ``run_case`` in their own process for the one-process reference of the same global
batch. Each case writes ``<out>.pt`` (rank 0): per-step losses of every rank, and the full (gathered)
weights before and after training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from finetune.optim import OptimizerConfig  # noqa: E402
from finetune.tasks import ClassificationTask, SFTTask  # noqa: E402

LABELS = ["a", "b", "c"]
ROWS = 16


def rows(case: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Fixed inputs (no padding, no augmentation), so every process count sees the same numbers."""
    generator = torch.Generator().manual_seed(1)
    if case["kind"] == "timm":
        pixels = torch.randn(ROWS, 3, 160, 160, generator=generator)
        return [{"pixel_values": pixels[i], "labels": torch.tensor(i % 3)} for i in range(ROWS)]
    ids = torch.randint(5, case["vocab"], (ROWS, 8), generator=generator)
    if case["kind"] == "causal_lm":
        # Responses of different lengths: token-level normalisation differs from a mean of batch means.
        labels = ids.clone()
        for i in range(ROWS):
            labels[i, : 2 + i % 5] = -100
        return [
            {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
            for i in range(ROWS)
        ]
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": torch.tensor(i % 3),
        }
        for i in range(ROWS)
    ]


def task(case: dict[str, Any]) -> pl.LightningModule:
    # eps 1e-6: rounding noise in gradients that are truly zero (key biases) must not become lr-sized steps.
    optimizer = OptimizerConfig(name="adamw", lr=case.get("lr", 0.01), weight_decay=0.1, eps=1e-6)
    if case["kind"] == "causal_lm":
        return SFTTask(case["backbone"], strategy=case["strategy"], samples=0, optimizer=optimizer)
    return ClassificationTask(case["backbone"], strategy=case["strategy"], labels=LABELS, optimizer=optimizer)


class Record(pl.Callback):
    """Every rank's training loss per step, and the full weights at the start and the end (gathered)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = full_state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.final = full_state(pl_module)
        losses = torch.tensor(self.losses)
        self.all_losses = trainer.strategy.all_gather(losses) if trainer.world_size > 1 else losses[None]


def full_state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """Every weight of ``module`` in full, on the CPU (a collective when the module is sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from finetune.parallel.placement import is_sharded

    if not is_sharded(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.clone() for k, v in get_model_state_dict(module, options=options).items()}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Train ``case`` with ``case["devices"]`` processes; the global batch is ``case["batch"]``."""
    from finetune.callbacks import Distillation, GradualUnfreezing
    from finetune.parallel.fsdp2 import FSDP2Strategy

    pl.seed_everything(0, verbose=False)
    devices = case["devices"]
    callbacks: list[pl.Callback] = [Record()]
    if case.get("unfreeze"):
        callbacks.append(GradualUnfreezing(every=1, interval="step"))
    if case.get("teacher"):
        callbacks.append(Distillation(teacher=case["teacher"], alpha=0.5, temperature=2.0))
    if case.get("checkpoints"):
        callbacks.append(ModelCheckpoint(dirpath=case["checkpoints"], filename="last", save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=FSDP2Strategy(**case.get("fsdp2", {})) if devices > 1 else "auto",
        max_epochs=case.get("epochs", 2),
        logger=False,
        enable_checkpointing=bool(case.get("checkpoints")),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=case["root"],
        use_distributed_sampler=False,
    )
    module = task(case)
    # Rank r reads rows r, r + devices, ...: together the ranks' batches are the one-process batch.
    rank = int(os.environ.get("RANK", 0))
    data = DataLoader(rows(case), batch_size=case["batch"] // devices, sampler=range(rank, ROWS, devices))
    trainer.fit(module, data, ckpt_path=case.get("resume"))
    record = callbacks[0]
    return {
        "losses": record.all_losses,
        "initial": record.initial,
        "final": record.final,
        "rank": trainer.global_rank,
    }


if __name__ == "__main__":
    for case in json.loads(Path(sys.argv[1]).read_text()):
        result = run_case(case)
        if result["rank"] == 0:
            torch.save({k: v for k, v in result.items() if k != "rank"}, case["out"])
