"""A run's ``metrics.csv`` read back: each metric's train and val curve, the learning rates, and the metrics
of the exported model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from finetune.tasks.base import Monitor

METRICS = "metrics.csv"  # the CSV logger's file in the run folder
STAGES = ("train", "val")  # the stages drawn as curves; test metrics are single values
# Learning-rate columns: RunReport's ``lr/<group name>``, Lightning's LearningRateMonitor ``lr-<optimizer>...``.
LR_PREFIXES = ("lr/", "lr-")


@dataclass(frozen=True)
class Curve:
    """One logged column against the optimizer step at which it was logged."""

    column: str
    steps: np.ndarray
    values: np.ndarray


def read_metrics(run: Path) -> pd.DataFrame | None:
    """The run's ``metrics.csv``, or None when it has none (nothing was logged)."""
    path = Path(run) / METRICS
    return pd.read_csv(path) if path.is_file() else None


def curves(frame: pd.DataFrame) -> dict[str, list[Curve]]:
    """Per metric name (``loss`` for ``train/loss`` and ``val/loss``), its train and val curves, in the
    order the metrics first appear in the file."""
    grouped: dict[str, list[Curve]] = {}
    for column in frame.columns:
        stage, _, name = column.partition("/")
        if stage in STAGES and name:
            curve = _curve(frame, column)
            if len(curve.steps):
                grouped.setdefault(name, []).append(curve)
    return grouped


def lr_curves(frame: pd.DataFrame) -> list[Curve]:
    """The learning rate of each parameter group that was logged, one curve per column."""
    found = (_curve(frame, column) for column in frame.columns if column.startswith(LR_PREFIXES))
    return [curve for curve in found if len(curve.steps)]


def exported_metrics(frame: pd.DataFrame, monitor: Monitor | None) -> dict[str, float]:
    """The metrics of the exported model: the validation metrics of the epoch where ``monitor.metric`` was
    best (the epoch of the best checkpoint, which the export holds; the first such epoch on a tie, as
    ``ModelCheckpoint`` keeps it), else of the last validation epoch; then the last test metrics (the test
    after a fit runs on the best checkpoint)."""
    metrics: dict[str, float] = {}
    val = [column for column in frame.columns if column.startswith("val/")]
    if val:
        rows = frame.dropna(subset=val, how="all")
        scores = rows[monitor.metric].dropna() if monitor is not None and monitor.metric in val else None
        if scores is not None and len(scores):
            chosen = scores.idxmax() if monitor.mode == "max" else scores.idxmin()
        else:
            chosen = rows.index[-1] if len(rows) else None
        if chosen is not None:
            row = frame.loc[chosen, val]
            metrics.update({column: float(value) for column, value in row.items() if pd.notna(value)})
    for column in (c for c in frame.columns if c.startswith("test/")):
        values = frame[column].dropna()
        if len(values):
            metrics[column] = float(values.iloc[-1])
    return metrics


def _curve(frame: pd.DataFrame, column: str) -> Curve:
    rows = frame[["step", column]].dropna()
    return Curve(column, rows["step"].to_numpy(), rows[column].to_numpy(dtype=float))
