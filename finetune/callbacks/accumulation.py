"""Gradient accumulation that changes during a run, keyed on epochs or on optimizer steps.

Fixed accumulation is the Trainer's own (``trainer.accumulate_grad_batches: 4``), and so is clipping
(``trainer.gradient_clip_val: 1.0`` with ``trainer.gradient_clip_algorithm: norm`` or ``value``; Lightning
clips after ``on_before_optimizer_step``, i.e. after token-level loss normalisation).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from finetune.errors import RecipeError

KEY = "trainer.callbacks.ScheduledAccumulation"


class ScheduledAccumulation(pl.Callback):
    """Set ``trainer.accumulate_grad_batches`` from a schedule ``{start: factor}``.

    With ``interval="epoch"`` a factor applies from epoch ``start`` on (like Lightning's
    ``GradientAccumulationScheduler``). With ``interval="step"`` it applies from optimizer step ``start``
    (the counter the LR schedule uses): the change takes effect at the first optimizer-step boundary at or
    after ``start`` whose in-epoch batch index is a multiple of the new factor, because Lightning decides
    when to step (and zero gradients) by ``batch_idx % factor``. Before the smallest key the factor is 1.

    The LR schedule's length comes from ``total_optimizer_steps``, which replays exactly this rule.
    Needs the Trainer's own ``accumulate_grad_batches`` at 1 and a strategy that lets the factor change
    mid-run (DeepSpeed fixes it in its config: use the Trainer's fixed accumulation there).

    Example::

        trainer = Trainer(callbacks=[ScheduledAccumulation({0: 8, 4: 4, 8: 1})], max_epochs=10)
    """

    def __init__(self, schedule: dict[int, int], interval: Literal["epoch", "step"] = "epoch") -> None:
        if interval not in ("epoch", "step"):
            raise RecipeError(f"{KEY}.interval", f"{interval!r} is not 'epoch' or 'step'")
        if not schedule or any(int(k) < 0 or int(v) < 1 for k, v in schedule.items()):
            raise RecipeError(f"{KEY}.schedule", "give {start: factor} with start >= 0 and factor >= 1")
        self.schedule = {int(k): int(v) for k, v in sorted(schedule.items(), key=lambda kv: int(kv[0]))}
        self.interval = interval
        self.factor = self.factor_at(0)
        self._seen_step = -1

    def factor_at(self, position: int) -> int:
        """The scheduled factor at epoch or optimizer step ``position``."""
        factor = 1
        for start, value in self.schedule.items():
            if start <= position:
                factor = value
        return factor

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.strategy.handles_gradient_accumulation:
            raise RecipeError(
                KEY,
                f"{type(trainer.strategy).__name__} fixes accumulation; use trainer.accumulate_grad_batches",
            )
        if trainer.accumulate_grad_batches != 1:
            raise RecipeError(
                "trainer.accumulate_grad_batches", "leave it at 1 when ScheduledAccumulation sets the factor"
            )
        if not pl_module.automatic_optimization:
            raise RecipeError(KEY, "needs automatic optimization; accumulate by hand in manual optimization")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.accumulate_grad_batches = self.factor  # the restored factor after a resume

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self.factor = trainer.accumulate_grad_batches = self.factor_at(trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.interval != "step":
            return
        at_boundary = batch_idx == 0 or trainer.global_step != self._seen_step
        self._seen_step = trainer.global_step
        wanted = self.factor_at(trainer.global_step)
        if at_boundary and wanted != self.factor and batch_idx % wanted == 0:
            self.factor = wanted
        trainer.accumulate_grad_batches = self.factor

    def total_optimizer_steps(self, trainer: pl.Trainer) -> int:
        """Optimizer steps the run will take (for the LR schedule): Lightning's stepping rule replayed."""
        trainer.estimated_stepping_batches  # noqa: B018  (sets up the train dataloader, so the count is known)
        batches, max_epochs, max_steps = trainer.num_training_batches, trainer.max_epochs, trainer.max_steps
        if max_steps < 0 and (max_epochs is None or max_epochs < 0):
            raise RecipeError("trainer.max_steps", "the run has no end; set trainer.max_epochs or max_steps")
        steps, factor, epoch = 0, self.factor_at(0), 0
        while (max_epochs is None or max_epochs < 0 or epoch < max_epochs) and (
            max_steps < 0 or steps < max_steps
        ):
            if self.interval == "epoch":
                steps += -(-int(batches) // self.factor_at(epoch))
            else:
                stepped = True
                for index in range(int(batches)):
                    wanted = self.factor_at(steps)
                    if stepped and wanted != factor and index % wanted == 0:
                        factor = wanted
                    stepped = (index + 1) % factor == 0 or index + 1 == batches
                    steps += stepped
                    if 0 <= max_steps <= steps:
                        break
            epoch += 1
        return steps if max_steps < 0 else min(steps, max_steps)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factor = int(state_dict["factor"])
