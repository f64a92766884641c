"""Export the fine-tuned model into the run folder when training ends."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from typing_extensions import override

from finetune import runs

log = logging.getLogger(__name__)


class ExportModel(pl.Callback):
    """At the end of ``fit``, loads the best checkpoint's weights (when a monitored checkpoint exists) and
    calls ``pl_module.export(<run>/export)``, which writes a model that loads without ``finetune``.

    Contract: the module implements ``load_weights(state_dict)`` and ``export(directory: Path) -> Path``
    (every ``finetune`` task does; adapter runs export the adapters alone, see ``python -m finetune export``).
    """

    def __init__(self, dirname: str = runs.EXPORT, use_best: bool = True) -> None:
        self.dirname = dirname
        self.use_best = use_best

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if self.use_best and best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            pl_module.load_weights(state)
            log.info("Loaded the best checkpoint %s for export", best)
        if trainer.is_global_zero:
            directory = pl_module.export(runs.run_dir(trainer) / self.dirname)
            log.info("Exported the model to %s", directory)
        trainer.strategy.barrier("export")
