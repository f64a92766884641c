"""Optimisation: parameter groups (per-pattern and layer-wise LRs), optimizers and LR schedules.

The recipe's ``optimizer:`` section is an ``OptimizerConfig`` and its ``lr_scheduler:`` section a
``ScheduleConfig``; ``build_param_groups`` → ``build_optimizer`` → ``build_schedule`` turn them into torch
objects. Heavy modules load on first use.
"""

from __future__ import annotations

from finetune._lazy import lazy_attributes
from finetune.optim.config import OptimizerConfig, ParamGroup, ScheduleConfig

_LAZY = {
    "param_groups": "finetune.optim.param_groups",
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
