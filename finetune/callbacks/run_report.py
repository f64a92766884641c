"""Draw the run: the learning rates into ``metrics.csv`` while training, then plots and ``report.html``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from finetune import runs
from finetune.callbacks.export import ExportModel, write_export_card
from finetune.parallel.placement import is_sharded
from finetune.report import VAL_PREDICTIONS, write_report
from finetune.report.evaluation import draws_predictions, predict_rows

log = logging.getLogger(__name__)

LR = "lr"  # logged as lr/<group name>: the columns LearningRateMonitor writes for finetune's schedule "lr"


class RunReport(pl.Callback):
    """Logs each parameter group's learning rate while training; writes the run's plots and ``report.html``
    when ``fit`` ends and again when ``test`` ends (``finetune.report``). Rank 0 writes.

    Contract:

    - Every ``trainer.log_every_n_steps`` optimizer steps, each optimizer group's LR goes to the trainer's
      loggers as ``lr/<group name>`` (``lr/<index>`` for an unnamed group): the columns Lightning's
      ``LearningRateMonitor`` would write for finetune's schedule, so add one or the other, not both.
    - When ``fit`` ends (in ``teardown``: after every callback's ``on_fit_end``, so after ``ExportModel``
      loaded the best checkpoint), a finetune classification task (single- or multi-label) predicts the
      whole validation split (its datamodule's ``val_dataloader()``) into ``<run>/val_predictions.csv``, which
      the confusion matrix or the precision-recall curves are drawn from. Sharded (``fsdp2``) models and
      interrupted fits skip this; other modules get the metric curves alone.
    - Then, and after each ``test``, ``<run>/plots/*.png`` and ``<run>/report.html`` are rewritten from the
      run's files (``python -m finetune report RUN_DIR`` does the same later), and the model card of the
      run's export (``ExportModel``'s folder, when there is one) is rewritten to show them and the test
      metrics. Without matplotlib: one warning, and a report without plots.

    Example::

        trainer = pl.Trainer(callbacks=[ExportModel(), RunReport()], logger=CSVLogger("runs"))
        trainer.fit(task, datamodule=data)  # runs/lightning_logs/version_0/report.html

    Args:
        log_lr: log the learning rates (turn off when a ``LearningRateMonitor`` already does).
    """

    def __init__(self, log_lr: bool = True) -> None:
        self.log_lr = log_lr
        self._logged_step = -1  # the step whose LRs were logged: accumulation starts several batches per step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.log_lr or step == self._logged_step or step % max(trainer.log_every_n_steps, 1):
            return
        self._logged_step = step
        rates = {
            f"{LR}/{group.get('name', i)}": group["lr"]
            for optimizer in trainer.optimizers
            for i, group in enumerate(optimizer.param_groups)
        }
        for logger in trainer.loggers:
            logger.log_metrics(rates, step=step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in ("fit", "test") or trainer.interrupted or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # loggers write out at their own finalize, after this hook
            logger.save()
        run = runs.run_dir(trainer)
        if stage == "fit" and draws_predictions(pl_module) and not is_sharded(pl_module):
            self._write_predictions(trainer, pl_module, run)
        page = write_report(run)
        log.info("Wrote the run's report to %s", page)
        export = _export_folder(trainer, run)
        if export is not None:
            write_export_card(trainer, pl_module, export)

    @staticmethod
    def _write_predictions(trainer: pl.Trainer, pl_module: pl.LightningModule, run: Path) -> None:
        data = trainer.datamodule
        loader = data.val_dataloader() if data is not None and is_overridden("val_dataloader", data) else []
        if isinstance(loader, (list, tuple)):  # none (finetune's data without a validation split) or several
            log.info("No single validation split to draw the classifier's predictions from")
            return
        predict_rows(trainer, pl_module, loader).to_csv(run / VAL_PREDICTIONS, index=False)


def _export_folder(trainer: pl.Trainer, run: Path) -> Path | None:
    """The folder ``ExportModel`` wrote this run's model to, if it did."""
    exporter = next((c for c in trainer.callbacks if isinstance(c, ExportModel)), None)
    folder = run / exporter.dirname if exporter is not None else None
    return folder if folder is not None and folder.is_dir() else None
