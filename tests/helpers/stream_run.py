"""Training on streamed text data with a module that only records which rows each step saw; shared by the
in-process streaming tests and the DDP script.

``python tests/helpers/stream_run.py BERT_DIR CSV MAX_STEPS OUT.json`` (with the repository root on
``PYTHONPATH``) runs it under DDP on 2 CPU processes; each rank writes ``OUT.json.<rank>``.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from finetune.data import TextClassificationData  # noqa: E402


class Recorder(pl.LightningModule):
    """Records ``(epoch, row indices)`` per training step; its one weight makes the optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch["index"].tolist()))
        return self.weight.sum() + batch["labels"].float().mean() * 0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # As finetune's schedules do: Lightning builds the train loader to count the steps, before a
        # resumed run's epoch is restored.
        assert self.trainer.estimated_stepping_batches == self.trainer.max_steps
        return torch.optim.SGD(self.parameters(), lr=0.1)


def stream_data(bert_dir: str, csv: str, **kwargs) -> TextClassificationData:
    options = {"batch_size": 4, "val_fraction": 0, "shuffle_buffer": 8, "labels": ["neg", "pos"]}
    return TextClassificationData(train=csv, backbone=bert_dir, streaming=True, **(options | kwargs))


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
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
    return pl.Trainer(**(options | kwargs))


if __name__ == "__main__":
    bert_dir, csv, max_steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    fit = trainer(max_steps, devices=2, strategy="ddp")
    model = Recorder()
    fit.fit(model, datamodule=stream_data(bert_dir, csv))
    with open(f"{out}.{fit.global_rank}", "w") as f:
        json.dump(model.seen, f)
