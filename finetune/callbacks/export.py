"""Export the fine-tuned model into the run folder when training ends."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from typing_extensions import override

from finetune import runs
from finetune.errors import RecipeError
from finetune.parallel.placement import is_sharded
from finetune.report.card import write_card

log = logging.getLogger(__name__)


class ExportModel(pl.Callback):
    """At the end of ``fit``, loads the best checkpoint's weights (when a monitored checkpoint exists) and
    calls ``pl_module.export(<run>/export)``, which writes a model that loads without ``finetune``.

    A finetune task's export gets a model card (``README.md``, ``finetune.report.card``) from the run folder.

    Contract: the module implements ``load_weights(state_dict)`` and ``export(directory: Path) -> Path``
    (every ``finetune`` task does; adapter runs export the adapters alone, see ``python -m finetune export``).
    A sharded model (``fsdp2``) is exported by rank 0 from the checkpoint (best, else the latest), consolidated
    on the CPU as ``python -m finetune export`` does, so a sharded run needs checkpointing.
    """

    def __init__(self, dirname: str = runs.EXPORT, use_best: bool = True) -> None:
        self.dirname = dirname
        self.use_best = use_best

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        missing = [
            name for name in ("export", "load_weights") if not callable(getattr(pl_module, name, None))
        ]
        if stage == "fit" and missing:
            raise RecipeError(
                "trainer.callbacks.ExportModel",
                f"{type(pl_module).__name__} has no {' or '.join(missing)}; finetune's tasks have them, for "
                "your own module save the network yourself (e.g. self.net.save_pretrained(...)) and drop ExportModel",
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if is_sharded(pl_module):
            self._export_from_checkpoint(trainer, pl_module, best)
            return
        if self.use_best and best:
            # Memory-mapped: the checkpoint's optimizer state (about twice the weights) is never read in.
            state = torch.load(best, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
            pl_module.load_weights(state)
            log.info("Loaded the best checkpoint %s for export", best)
        if trainer.is_global_zero:
            directory = pl_module.export(runs.run_dir(trainer) / self.dirname)
            write_export_card(trainer, pl_module, directory)
            log.info("Exported the model to %s", directory)
        trainer.strategy.barrier("export")

    def _export_from_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, best: str) -> None:
        latest = max(
            (
                Path(p)
                for c in trainer.checkpoint_callbacks
                for p in (c.last_model_path, c.best_model_path)
                if p
            ),
            key=lambda path: path.stat().st_mtime,
            default=None,
        )
        path = Path(best) if self.use_best and best else latest
        if path is None:
            raise RecipeError(
                "trainer.enable_checkpointing",
                "a sharded model is exported from its checkpoint; keep checkpointing on, or export yourself",
            )
        trainer.strategy.barrier("checkpoint written")
        if trainer.is_global_zero:
            task = runs.load_checkpoint(path, type(pl_module))
            directory = task.export(runs.run_dir(trainer) / self.dirname)
            write_export_card(trainer, task, directory)
            log.info("Exported the model of %s to %s", path, directory)
        trainer.strategy.barrier("export")


def write_export_card(trainer: pl.Trainer, task: pl.LightningModule, directory: Path) -> Path | None:
    """Write the model card of export ``directory`` from a finetune ``task`` and the trainer's run folder,
    after the loggers write out what they hold (the CSV logger writes ``metrics.csv`` in batches). Another
    module's export gets none (a card describes a finetune task: its backbone, strategy and metric)."""
    from finetune.tasks import FinetuneTask

    if not isinstance(task, FinetuneTask):
        return None
    for logger in trainer.loggers:
        logger.save()
    return write_card(task, runs.run_dir(trainer), directory)
