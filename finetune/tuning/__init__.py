"""Tuning: the learning-rate range test over every parameter group, and hyperparameter sweeps.

``find_lr`` runs Lightning's LR finder with all parameter groups moving together (their ratios kept);
``parse_space`` reads a sweep's search space (recipe keys to Optuna distributions); ``TrialReport`` reports a
run's monitored metric to an Optuna trial and ends a pruned run cleanly. The commands are
``python -m finetune lr-find`` and ``python -m finetune sweep``. Heavy modules load on first use.
"""

from __future__ import annotations

from finetune._lazy import lazy_attributes
from finetune.tuning.space import Dimension, parse_space

_LAZY = {
    "GroupRatioLRFinder": "finetune.tuning.lr_find",
    "LRSearch": "finetune.tuning.lr_find",
    "find_batch_size": "finetune.tuning.lr_find",
    "find_lr": "finetune.tuning.lr_find",
    "plot_search": "finetune.tuning.lr_find",
    "scaled_optimizer": "finetune.tuning.lr_find",
    "TrialFailed": "finetune.tuning.study",
    "TrialReport": "finetune.tuning.study",
    "open_study": "finetune.tuning.study",
    "run_study": "finetune.tuning.study",
    "summarise": "finetune.tuning.study",
}

__all__ = ["Dimension", "parse_space", *_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
