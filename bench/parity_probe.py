"""The callbacks ``bench.parity`` adds to the finetune side's run (``Probe``: it marks optimizer steps on the
side's clock, as the hand loops do, and keeps the metrics the run reports) and ``bench.parity_profile``
(``Stages``). Only the finetune side imports this module (and so Lightning)."""

from __future__ import annotations

import time
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


class Stages(pl.Callback):
    """For ``bench.parity_profile``: notes ``(stage, time, VmRSS, VmHWM)`` at each stage of a run in
    ``Stages.marks``; a stage's name says what happened since the previous one. Added by the command line."""

    marks: ClassVar[list[tuple[str, float, int, int]]] = []

    def mark(self, stage: str) -> None:
        from bench.parity_sides import status_bytes

        Stages.marks.append((stage, time.time(), status_bytes("VmRSS"), status_bytes("VmHWM")))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.mark("imports, recipe, trainer")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("data prepared, model built, optimizer")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("run plan (activation probe), sanity validation")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_step == 0:
            self.mark("first forward and backward")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.mark(f"training, epoch {trainer.current_epoch}")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.mark(f"validation, epoch {trainer.current_epoch}")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark(f"checkpoints, epoch {trainer.current_epoch}")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("export (best checkpoint loaded, model written)")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mark("test")
