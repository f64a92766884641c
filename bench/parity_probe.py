"""The callback ``bench.parity`` adds to the finetune side's run: it marks optimizer steps on the side's
clock (as the hand loops do) and keeps the metrics the run reports."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from typing_extensions import override


class Probe(pl.Callback):
    """Added by the command line (``--trainer.callbacks+=bench.parity_probe.Probe``), so it takes no
    arguments: the side sets ``Probe.clock`` before the run and reads ``Probe.metrics`` after it (each
    logged metric's values, one per validation or test pass, sanity checks left out)."""

    clock: ClassVar[Any] = None
    metrics: ClassVar[dict[str, list[float]]] = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.start(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.clock.step(trainer.current_epoch)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._keep(trainer, "val/")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep(trainer, "test/")

    def _keep(self, trainer: pl.Trainer, prefix: str) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith(prefix):
                Probe.metrics.setdefault(name, []).append(float(value))
