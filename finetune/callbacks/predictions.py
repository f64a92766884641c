"""Write ``predict`` results to ``<run>/predictions.csv``: one row per input, joined back to its data row."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from finetune import runs
from finetune.errors import RecipeError

log = logging.getLogger(__name__)

CHUNK = 50_000  # rows written at a time


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted row's data columns and the task's prediction columns.

    Contract: ``predict_step`` outputs ``{"index": (B,), "values": (B, ...)}`` (the same trailing shape in
    every batch), the module's ``prediction_columns(values, rows)`` turns a chunk of values and their data
    rows (a DataFrame) into named columns (``ClassificationTask``: the predicted label and ``p_<label>``),
    and the datamodule's ``predict_table()`` (a pandas DataFrame or a ``datasets.Dataset``: its row ``i``
    is the row with ``index`` ``i``) gives the rows. The file is written ``CHUNK`` rows at a time, so a
    large predict split never sits in memory as a table. Under DDP every rank predicts a share: the shares
    are gathered and rank 0 writes one file, each row once.
    """

    def __init__(self, filename: str = runs.PREDICTIONS) -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict" and not callable(getattr(pl_module, "prediction_columns", None)):
            raise RecipeError(
                "trainer.callbacks.PredictionWriter",
                f"{type(pl_module).__name__} has no prediction_columns(values, rows); finetune's tasks have it, "
                "for your own module write predictions from trainer.predict's return value instead",
            )
        if stage == "predict" and not callable(getattr(trainer.datamodule, "predict_table", None)):
            raise RecipeError(
                "trainer.callbacks.PredictionWriter",
                "the datamodule has no predict_table(); use one of finetune's data modules or drop PredictionWriter",
            )

    @override
    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        index = torch.cat([p["index"] for p in predictions])
        values = torch.cat([p["values"] for p in predictions])
        if trainer.world_size > 1:
            index, values = _gather(pl_module, index, values)
        if not trainer.is_global_zero:
            return
        index, first = _first_occurrences(index.cpu())
        values = values.cpu()[first]
        table = trainer.datamodule.predict_table()
        path = runs.run_dir(trainer) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        for start in range(0, max(len(index), 1), CHUNK):
            rows = _rows(table, index[start : start + CHUNK].numpy())
            for name, column in pl_module.prediction_columns(values[start : start + CHUNK], rows).items():
                rows[name] = column
            rows.to_csv(path, index=False, mode="a" if start else "w", header=not start)
        log.info("Wrote %d predictions to %s", len(index), path)


def _rows(table: Any, index: np.ndarray) -> pd.DataFrame:
    """The rows at ``index`` of a DataFrame or a ``datasets.Dataset``, as a new DataFrame."""
    if isinstance(table, pd.DataFrame):
        return table.iloc[index].reset_index(drop=True)
    return table.select(index).to_pandas()


def _gather(
    pl_module: pl.LightningModule, index: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's predictions; shares may differ in size, so each is padded (index -1) to the largest."""
    size = int(pl_module.all_gather(torch.tensor(len(index), device=index.device)).max())
    padding = size - len(index)
    index = torch.cat([index, index.new_full((padding,), -1)])
    values = torch.cat([values, values.new_zeros(padding, *values.shape[1:])])
    index = pl_module.all_gather(index).flatten()
    values = pl_module.all_gather(values).flatten(0, 1)
    real = index >= 0
    return index[real], values[real]


def _first_occurrences(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct row indices in ascending order, and where each first occurs in ``index``."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    keep = torch.ones_like(ordered, dtype=torch.bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return ordered[keep], order[keep]
