"""The learning-rate range test over every parameter group at once, and the batch-size search before it.

Lightning's LR finder gives every parameter group the same LR (``_LRFinder._exchange_scheduler``), while
finetune's groups differ on purpose: the head against the backbone, layer-wise decay, per-pattern LRs. Here
the finder searches over the *base* LR, ``optimizer.lr``: at each optimizer step every group trains at the
searched value times its ratio to the base LR in the configured optimizer, so the loss curve is that of the
recipe's own LR layout scaled up step by step, and its suggestion is a value for ``optimizer.lr``.

Weights, optimizer and loop state are restored after the search (Lightning saves and reloads a checkpoint
under ``trainer.default_root_dir``, then deletes it). The recipe's callbacks do not run during the search:
Lightning runs its own alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from typing_extensions import override

from finetune.errors import require
from finetune.optim import OptimizerConfig


@dataclass(frozen=True)
class LRSearch:
    """What the search saw and suggests.

    Attributes:
        lrs: the base LR (``optimizer.lr``) of each step.
        losses: the smoothed training loss after each step (Lightning's running average).
        suggestion: the base LR at the steepest fall of the loss, or None when too few steps ran.
        groups: the optimizer's parameter groups, by name.
        ratios: each group's LR over the base LR in the configured optimizer.
        applied: each step's LR of every group, as the optimizer used it.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    groups: list[str]
    ratios: list[float]
    applied: list[list[float]]

    def group_lrs(self, lr: float) -> list[float]:
        """Each group's LR when the base LR is ``lr``."""
        return [lr * ratio for ratio in self.ratios]


class GroupRatioLRFinder(LearningRateFinder):
    """Lightning's ``LearningRateFinder`` over the base LR, every group keeping its ratio to it.

    Before each optimizer step a step pre-hook sets each group's LR to the finder's value times the group's
    ratio; a post-hook puts the finder's value back, so the finder's own schedule and records stay in base-LR
    units. Ratios come from each group's ``initial_lr`` (its configured LR: a warmup or gradual-unfreezing
    gate has not scaled it) over ``base_lr``. The search runs ``steps`` optimizer steps over as many epochs
    as it takes, then ends ``fit`` (as ``Tuner.lr_find`` does).

    Example::

        finder = GroupRatioLRFinder(base_lr=1e-4, min_lr=1e-7, max_lr=1.0, steps=100)
        trainer = Trainer(callbacks=[finder])
        trainer.fit(model, datamodule=data)
        finder.optimal_lr.suggestion()
    """

    def __init__(self, base_lr: float, min_lr: float, max_lr: float, steps: int) -> None:
        super().__init__(min_lr=min_lr, max_lr=max_lr, num_training_steps=steps, update_attr=False)
        self._early_exit = True  # as Tuner.lr_find: stop fit once the search is done
        self.base_lr = base_lr
        self.groups: list[str] = []
        self.ratios: list[float] = []
        self.applied: list[list[float]] = []
        self._searched: list[float] = []

    @override
    def lr_find(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(len(trainer.optimizers) == 1, "model", "the LR finder needs exactly one optimizer")
        (optimizer,) = trainer.optimizers
        groups = optimizer.param_groups
        self.groups = [str(group.get("name", f"group {i}")) for i, group in enumerate(groups)]
        self.ratios = [group.get("initial_lr", group["lr"]) / self.base_lr for group in groups]
        hooks = [
            optimizer.register_step_pre_hook(self._scale),
            optimizer.register_step_post_hook(self._restore),
        ]
        epochs = trainer.fit_loop.max_epochs
        trainer.fit_loop.max_epochs = -1  # `steps` bounds the search, not the recipe's epochs
        try:
            super().lr_find(trainer, pl_module)
        finally:
            for hook in hooks:
                hook.remove()
            trainer.fit_loop.max_epochs = epochs

    def _scale(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._searched = [group["lr"] for group in optimizer.param_groups]
        for group, ratio in zip(optimizer.param_groups, self.ratios):
            group["lr"] = group["lr"] * ratio
        self.applied.append([group["lr"] for group in optimizer.param_groups])

    def _restore(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group, searched in zip(optimizer.param_groups, self._searched):
            group["lr"] = searched


def check_search(min_lr: float, max_lr: float, steps: int) -> None:
    """RecipeError naming the option unless ``0 < min_lr < max_lr`` and ``steps >= 2``."""
    require(0 < min_lr < max_lr, "--min-lr", f"give 0 < min-lr < max-lr (got {min_lr:g} and {max_lr:g})")
    require(steps >= 2, "--steps", f"must be 2 or more, got {steps}")


def find_lr(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    *,
    base_lr: float,
    min_lr: float = 1e-7,
    max_lr: float = 1.0,
    steps: int = 100,
) -> LRSearch:
    """Run the range test (``GroupRatioLRFinder``) on ``trainer``: ``steps`` optimizer steps with the base LR
    rising exponentially from ``min_lr`` to ``max_lr`` (stopping early when the loss diverges). ``model`` keeps
    its weights. ``base_lr`` is the LR the model's optimizer gives the base group (``optimizer.lr``)."""
    check_search(min_lr, max_lr, steps)
    finder = GroupRatioLRFinder(base_lr, min_lr, max_lr, steps)
    callbacks = trainer.callbacks
    # First, as Tuner.lr_find puts it: the search ends fit before any other callback's on_fit_start.
    trainer.callbacks = [finder, *callbacks]
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        trainer.callbacks = callbacks
    found = finder.optimal_lr
    require(found is not None, "trainer.fast_dev_run", "the LR finder skips fast_dev_run; turn it off")
    suggestion = found.suggestion()
    return LRSearch(
        lrs=[float(lr) for lr in found.results["lr"]],
        losses=[float(loss) for loss in found.results["loss"]],
        suggestion=None if suggestion is None else float(suggestion),
        groups=finder.groups,
        ratios=finder.ratios,
        applied=finder.applied,
    )


def find_batch_size(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule
) -> int | None:
    """Lightning's batch-size finder from the data's own ``batch_size`` up: doubled until out of memory (or
    until the training data is no larger), then kept, with the found size set on ``datamodule``. An
    accelerator's memory ends the search; on a CPU only the data size (or 8192) does."""
    from lightning.pytorch.tuner import Tuner

    require(
        isinstance(getattr(datamodule, "batch_size", None), int),
        "data",
        "the batch-size finder needs a data module with a batch_size",
    )
    return Tuner(trainer).scale_batch_size(model, datamodule=datamodule, init_val=datamodule.batch_size)


def scaled_optimizer(config: OptimizerConfig, lr: float) -> OptimizerConfig:
    """``config`` with base LR ``lr`` and every group's own LR (``groups[*].lr``) scaled by the same factor, so
    each parameter group's LR is ``lr`` times its ratio to the base LR, as in the search."""
    factor = lr / config.lr
    groups = [group if group.lr is None else replace(group, lr=group.lr * factor) for group in config.groups]
    return replace(config, lr=lr, groups=groups)


def plot_search(search: LRSearch, path: Path) -> Path:
    """Write the loss against the base LR (log scale) to ``path`` (a png), the suggestion marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)  # draws without pyplot: no GUI backend, no global figure
    axes = figure.subplots()
    finite = [(lr, loss) for lr, loss in zip(search.lrs, search.losses) if math.isfinite(loss)]
    axes.plot([lr for lr, _ in finite], [loss for _, loss in finite])
    axes.set_xscale("log")
    axes.set_xlabel("optimizer.lr (each parameter group at its own ratio to it)")
    axes.set_ylabel("training loss (smoothed)")
    if search.suggestion is not None:
        axes.axvline(
            search.suggestion, color="red", linestyle="--", label=f"suggestion {search.suggestion:.3g}"
        )
        axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
