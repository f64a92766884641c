"""LR schedules stepped per optimizer step: linear warmup, then a registered decay shape.

One scheduler, ``GroupSchedule``, sets every group's LR to ``initial_lr * shape(step) * scale * gate``:
``initial_lr`` is the group's own LR (so the ratios between groups hold at every step), ``scale`` is what
``plateau`` lowers, and ``gate`` (``group.get("gate", 1.0)``) is what ``GradualUnfreezing`` opens per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from finetune.errors import RecipeError
from finetune.optim.config import ScheduleConfig
from finetune.optim.shapes import make_shape


class GroupSchedule(LRScheduler):
    """Sets each group's LR to ``initial_lr * shape(step) * scale * gate`` (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, shape: Callable[[int], float]) -> None:
        self.shape = shape
        self.scale = 1.0
        super().__init__(optimizer)

    def lrs(self) -> list[float]:
        ratio = self.shape(max(self.last_epoch, 0)) * self.scale
        return [g["initial_lr"] * ratio * g.get("gate", 1.0) for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        return self.lrs()

    def refresh(self) -> None:
        """Rewrite the current step's LRs (after a gate or ``scale`` changed), without advancing."""
        for group, lr in zip(self.optimizer.param_groups, self.lrs()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        # The shape is rebuilt from the recipe; keep the checkpoint plain data.
        return {k: v for k, v in super().state_dict().items() if k != "shape"}


class PlateauScale(ReduceLROnPlateau):
    """``plateau``: on a plateau of the monitored metric, lowers ``GroupSchedule.scale`` by ``factor``
    (down to ``floor``), so group ratios, warmup and gates keep working; stepped once per epoch."""

    def __init__(
        self, schedule: GroupSchedule, mode: str, factor: float, patience: int, floor: float
    ) -> None:
        self.schedule = schedule
        self.floor = floor
        super().__init__(schedule.optimizer, mode=mode, factor=factor, patience=patience)

    def _reduce_lr(self, epoch: int) -> None:
        self.schedule.scale = max(self.schedule.scale * self.factor, self.floor)
        self.schedule.refresh()

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k != "schedule"}


def total_steps(trainer: Any) -> int:
    """Optimizer steps in the run: asks a callback with ``total_optimizer_steps(trainer)`` (scheduled
    accumulation changes the count), else the trainer's ``estimated_stepping_batches``."""
    for callback in trainer.callbacks:
        count = getattr(callback, "total_optimizer_steps", None)
        if callable(count):
            return int(count(trainer))
    estimate = trainer.estimated_stepping_batches
    if math.isinf(estimate):
        raise RecipeError("trainer.max_steps", "the run has no end; set trainer.max_epochs or max_steps")
    return int(estimate)


def build_schedule(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, steps: int, monitor: str, mode: str
) -> list[dict[str, Any]]:
    """Lightning scheduler configs: ``GroupSchedule`` per step, plus ``PlateauScale`` per epoch for ``plateau``."""
    schedule = GroupSchedule(optimizer, make_shape(config, steps))
    configs = [{"scheduler": schedule, "interval": "step", "name": "lr"}]
    if config.name == "plateau":
        plateau = PlateauScale(schedule, mode, config.factor, config.patience, config.min_lr_ratio)
        configs.append({"scheduler": plateau, "interval": "epoch", "monitor": config.monitor or monitor})
    return configs
