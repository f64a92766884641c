"""Preemption (clusters, spot instances): on SIGTERM or SIGUSR1, save a resumable checkpoint and stop."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from finetune import runs
from finetune.data.loaders import LoaderDataModule

log = logging.getLogger(__name__)


class Preemption(pl.Callback):
    """When the process gets SIGTERM (Lightning's own notice) or SIGUSR1, finish the current batch, save
    ``<checkpoints>/last.ckpt`` (the folder of the trainer's checkpoint callback, else ``<run>/checkpoints``)
    and stop with Lightning's ``SIGTERMException``. ``--ckpt_path last`` resumes it: the checkpoint is taken
    mid-epoch and records how many batches of the epoch were trained on; on resume, a finetune data module's
    train loader (``ResumableLoader``) skips exactly those, so the run ends as an uninterrupted one would.
    With gradient accumulation, a signal inside an accumulation window loses that window's gradients.

    Under SLURM with auto-requeue, Lightning itself handles SIGUSR1 (it saves and requeues the job); this
    callback then leaves SIGUSR1 to it.
    """

    def __init__(self) -> None:
        self._requested = False
        self._previous: Any = None
        self._batches_done = 0  # in the current epoch, recorded in the checkpoint this callback saves
        self._datamodule: Any = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requested = False
        if hasattr(signal, "SIGUSR1") and not _slurm_requeues(trainer):
            self._previous = signal.signal(signal.SIGUSR1, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        self._requested = True
        if callable(self._previous):  # whoever listened before still hears it
            self._previous(signum, frame)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = self._requested or trainer.received_sigterm
        if trainer.world_size > 1:  # every process must save and stop at the same batch
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.checkpoint_path(trainer)
        self._batches_done = batch_idx + 1
        trainer.save_checkpoint(path)
        log.warning(
            "Preempted at step %d: saved %s; resume with --ckpt_path last (or --ckpt_path %s)",
            trainer.global_step,
            path,
            path,
        )
        raise SIGTERMException

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self._batches_done}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._datamodule = trainer.datamodule

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored before the train loader is made (Lightning makes it to count the steps of the schedule,
        # before any hook after this one): tell the data module what its first pass skips.
        skip = int(state_dict.get("batches_done", 0))
        if not skip:
            return
        if isinstance(self._datamodule, LoaderDataModule):
            self._datamodule.resume_skip = skip
        else:
            log.warning("Resuming mid-epoch: this data cannot skip the %d batches already trained on", skip)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    @staticmethod
    def checkpoint_path(trainer: pl.Trainer) -> Path:
        dirpath = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        folder = Path(dirpath) if dirpath else runs.run_dir(trainer) / runs.CHECKPOINTS
        return folder / f"{runs.LAST}.ckpt"


def _slurm_requeues(trainer: pl.Trainer) -> bool:
    """Lightning handles SIGUSR1 itself under SLURM with auto-requeue."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue
