"""Optimisation: parameter groups (per-pattern and layer-wise LRs), optimizers and LR schedules.

The recipe's ``optimizer:`` section is an ``OptimizerConfig`` and its ``lr_scheduler:`` section a
``ScheduleConfig``; ``param_groups`` → ``build_optimizer`` → ``build_schedule`` turn them into torch
objects. In your own ``LightningModule``, ``param_groups(self, lr=..., layer_decay=...)`` is the one call for
``configure_optimizers``. Heavy modules load on first use.
"""

from __future__ import annotations

from finetune._lazy import lazy_attributes
from finetune.optim.config import OptimizerConfig, ParamGroup, ScheduleConfig

_LAZY = {
    "param_groups": "finetune.optim.groups",
    "build_optimizer": "finetune.optim.optimizers",
    "OPTIMIZERS": "finetune.optim.optimizers",
    "build_schedule": "finetune.optim.schedules",
    "total_steps": "finetune.optim.schedules",
    "GroupSchedule": "finetune.optim.schedules",
    "SCHEDULES": "finetune.optim.shapes",
    "TokenNormalizedLoss": "finetune.optim.token_loss",
}

__all__ = ["OptimizerConfig", "ParamGroup", "ScheduleConfig", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
