"""Write ``predict`` results to ``<run>/predictions.csv``: one row per input, joined back to its data row."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes the predicted label and class probabilities per row.

    Needs ``predict_step`` outputs ``{"index", "probabilities"}`` and the datamodule's ``predict_table()``;
    the module's ``labels`` name the columns.
    """

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        index = torch.cat([p["index"] for p in predictions]).cpu()
        probabilities = torch.cat([p["probabilities"] for p in predictions]).float().cpu()
        table = trainer.datamodule.predict_table().iloc[index.numpy()].reset_index(drop=True)
        labels = list(pl_module.labels)
        table["prediction"] = [labels[i] for i in probabilities.argmax(-1).tolist()]
        for i, label in enumerate(labels):
            table[f"p_{label}"] = probabilities[:, i].numpy()
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
        log.info("Wrote %d predictions to %s", len(table), path)
