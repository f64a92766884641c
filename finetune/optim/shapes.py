"""LR shapes: the ratio of each group's LR at each optimizer step (linear warmup, then a registered decay).

Torch-free, so ``lr_scheduler.name`` validates without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.optim.config import SCHEDULE_KEY
from finetune.registry import Registry

if TYPE_CHECKING:
    from finetune.optim.config import ScheduleConfig

Decay = Callable[[float, float], float]  # (progress in [0, 1], floor) -> LR ratio

SCHEDULES: Registry[Decay] = Registry("LR schedule", f"{SCHEDULE_KEY}.name")


def _cosine(progress: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


SCHEDULES.register("constant")(lambda progress, floor: 1.0)
SCHEDULES.register("cosine")(_cosine)
SCHEDULES.register("linear")(lambda progress, floor: 1 - (1 - floor) * progress)
SCHEDULES.register("one_cycle")(_cosine)
SCHEDULES.register("plateau")(lambda progress, floor: 1.0)  # constant; PlateauScale lowers ``scale``

# one_cycle's defaults are those of torch's OneCycleLR (pct_start 0.3, div_factor 25).
_DEFAULT_WARMUP_FRACTION = {"one_cycle": 0.3}
_DEFAULT_START_RATIO = {"one_cycle": 1 / 25}


@dataclass(frozen=True)
class Shape:
    """The LR ratio at each optimizer step: linear warmup from ``start`` to 1, then ``decay`` to ``floor``."""

    decay: Decay
    total: int
    warmup: int
    floor: float = 0.0
    start: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start + (1 - self.start) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.decay(progress, self.floor)


def make_shape(config: ScheduleConfig, total_steps: int) -> Shape:
    """The shape of ``config`` over ``total_steps`` optimizer steps."""
    fraction = config.warmup_fraction
    if fraction is None and not config.warmup_steps:
        fraction = _DEFAULT_WARMUP_FRACTION.get(config.name)
    warmup = round(fraction * total_steps) if fraction is not None else config.warmup_steps
    start = config.start_lr_ratio
    if start is None:
        start = _DEFAULT_START_RATIO.get(config.name, 0.0)
    return Shape(SCHEDULES.get(config.name), total_steps, warmup, config.min_lr_ratio, start)
