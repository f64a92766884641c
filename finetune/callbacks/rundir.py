"""The run folder, as rank 0 sees it, without a collective call."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: pl.Trainer) -> Path:
    """``trainer.log_dir`` without its broadcast, for code that runs on rank 0 only.

    Under DDP ``trainer.log_dir`` is a collective (it broadcasts rank 0's folder); called from inside an
    ``if trainer.is_global_zero`` block it waits forever for the other ranks. Same rule as Lightning's.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return Path(directory or trainer.default_root_dir)
