"""Gradual unfreezing (ULMFiT): the head trains from the start, blocks join top-down at milestones."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from typing_extensions import override

from finetune.errors import RecipeError
from finetune.optim.schedules import GroupSchedule
from finetune.strategies.base import BATCHNORMS

log = logging.getLogger(__name__)

KEY = "trainer.callbacks.GradualUnfreezing"


class GradualUnfreezing(pl.Callback):
    """Open the blocks of the backbone top-down, one (or ``blocks_per_milestone``) per milestone.

    Contract: the optimizer's groups come from ``finetune.optim.param_groups`` (every ``FinetuneTask``;
    each group knows its ``level`` and ``block``), and the LR follows ``finetune.optim.GroupSchedule`` (the
    task's ``lr_scheduler``). Every group is built up front: a closed block's groups have their LR *gate*
    at 0, so the block cannot move (no gradient step, no decoupled weight decay). At its milestone the gate
    opens, ramping over ``warmup_steps``, and the block's optimizer state starts fresh. Its LR is the one
    its group was built with (layer-wise decay included). The head and what sits above the last block
    train from the start; the embeddings/stem open last. Blocks the strategy froze stay frozen.

    On one device a closed block also has ``requires_grad=False`` (no backward cost). Under DDP, FSDP2 or
    DeepSpeed, which cannot follow ``requires_grad`` changes mid-run, closed blocks keep computing gradients
    and only the gate holds them, so the set of trained parameters never changes and DDP's defaults
    (``find_unused_parameters=False``) are right. Closed BatchNorm layers stay in eval mode.
    State (which block opened at which optimizer step) is saved by block name, so a resumed run re-opens
    exactly what was open and nothing else.

    Args:
        milestones: epochs (or optimizer steps, with ``interval="step"``) at which the next blocks open.
        every: instead of ``milestones``: open the next blocks every ``every`` epochs/steps.
        interval: ``epoch`` or ``step``.
        blocks_per_milestone: how many blocks open at each milestone.
        warmup_steps: a newly opened block's LR ramps linearly to its full value over this many steps.

    Example::

        trainer = Trainer(callbacks=[GradualUnfreezing(every=1)])  # one more block per epoch
    """

    def __init__(
        self,
        milestones: list[int] | None = None,
        every: int | None = None,
        interval: Literal["epoch", "step"] = "epoch",
        blocks_per_milestone: int = 1,
        warmup_steps: int = 0,
    ) -> None:
        if (milestones is None) == (every is None):
            raise RecipeError(KEY, "give milestones or every, not both or neither")
        if every is not None and every < 1:
            raise RecipeError(f"{KEY}.every", f"must be >= 1, got {every}")
        if milestones is not None and (
            sorted(milestones) != list(milestones) or min(milestones, default=0) < 0
        ):
            raise RecipeError(f"{KEY}.milestones", f"must be increasing and >= 0, got {milestones}")
        if interval not in ("epoch", "step"):
            raise RecipeError(f"{KEY}.interval", f"{interval!r} is not 'epoch' or 'step'")
        if blocks_per_milestone < 1 or warmup_steps < 0:
            raise RecipeError(KEY, "blocks_per_milestone must be >= 1 and warmup_steps >= 0")
        self.milestones = list(milestones) if milestones is not None else None
        self.every = every
        self.interval = interval
        self.blocks_per_milestone = blocks_per_milestone
        self.warmup_steps = warmup_steps
        self.opened: dict[str, int] = {}  # block name -> optimizer step at which it opened
        self.order: list[str] = []  # blocks to open, top-down

    # -- schedule --------------------------------------------------------------------------------------

    def milestones_passed(self, position: int) -> int:
        """How many milestones lie at or before epoch/step ``position``."""
        if self.every is not None:
            return position // self.every
        return sum(1 for milestone in self.milestones if milestone <= position)

    def due(self, position: int) -> list[str]:
        """The blocks that are open at epoch/step ``position``."""
        return self.order[: self.milestones_passed(position) * self.blocks_per_milestone]

    # -- hooks -----------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = [g for optimizer in trainer.optimizers for g in optimizer.param_groups]
        if not groups or any("level" not in g for g in groups):
            raise RecipeError(
                KEY, "needs parameter groups from finetune.optim.param_groups (any FinetuneTask)"
            )
        self.schedule = self._schedule(trainer)
        top = max(g["level"] for g in groups)
        levels = sorted({g["level"] for g in groups if g["level"] < top}, reverse=True)
        self.order = [next(g["block"] for g in groups if g["level"] == level) for level in levels]
        # Several processes (DDP, FSDP2) or an engine that owns the parameters (DeepSpeed): never change
        # requires_grad mid-run; the LR gates alone hold closed blocks.
        self.gate_only = not isinstance(trainer.strategy, SingleDeviceStrategy)
        self.batchnorms = _batchnorms_by_block(pl_module, {b: _groups(trainer, b) for b in self.order})
        for block in self.order:
            self._set_trainable(trainer, block, block in self.opened)
        self._update(trainer)
        log.info(
            "Gradual unfreezing: %d blocks to open, top-down: %s", len(self.order), ", ".join(self.order)
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer)
        for block in self.order:
            if block not in self.opened:
                for module in self.batchnorms.get(block, ()):
                    module.eval()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"opened": dict(self.opened)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.opened = dict(state_dict["opened"])

    # -- helpers ---------------------------------------------------------------------------------------

    def _schedule(self, trainer: pl.Trainer) -> GroupSchedule:
        for config in trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, GroupSchedule):
                return config.scheduler
        raise RecipeError(KEY, "needs the LR schedule finetune.optim.GroupSchedule (any FinetuneTask's)")

    def _update(self, trainer: pl.Trainer) -> None:
        """Open due blocks; set every block's gate for the coming optimizer step."""
        position = trainer.current_epoch if self.interval == "epoch" else trainer.global_step
        for block in self.due(position):
            if block not in self.opened:
                self.opened[block] = trainer.global_step
                self._set_trainable(trainer, block, True)
                self._reset_state(trainer, block)
                for module in self.batchnorms.get(block, ()):
                    module.train(trainer.lightning_module.training)
                log.info("Gradual unfreezing: %s opens at step %d", block, trainer.global_step)
        for block in self.order:
            gate = self._gate(block, trainer.global_step)
            for group in _groups(trainer, block):
                group["gate"] = gate
        self.schedule.refresh()

    def _gate(self, block: str, step: int) -> float:
        if block not in self.opened:
            return 0.0
        if not self.warmup_steps:
            return 1.0
        return min(1.0, (step - self.opened[block] + 1) / self.warmup_steps)

    def _set_trainable(self, trainer: pl.Trainer, block: str, trainable: bool) -> None:
        if self.gate_only:
            return
        for group in _groups(trainer, block):
            for parameter in group["params"]:
                parameter.requires_grad_(trainable)

    def _reset_state(self, trainer: pl.Trainer, block: str) -> None:
        """A block joins with fresh optimizer state (under DDP it saw gradients while its gate was shut)."""
        for optimizer in trainer.optimizers:
            for group in _groups(trainer, block):
                for parameter in group["params"]:
                    optimizer.state.pop(parameter, None)


def _groups(trainer: pl.Trainer, block: str) -> list[dict[str, Any]]:
    """The block's groups, looked up by name each time: loading optimizer state replaces the group dicts."""
    return [g for optimizer in trainer.optimizers for g in optimizer.param_groups if g.get("block") == block]


def _batchnorms_by_block(
    pl_module: nn.Module, groups: dict[str, list[dict[str, Any]]]
) -> dict[str, list[nn.Module]]:
    """BatchNorm modules whose parameters sit in each block's groups."""
    owner = {
        id(p): block for block, block_groups in groups.items() for g in block_groups for p in g["params"]
    }
    found: dict[str, list[nn.Module]] = {}
    for module in pl_module.modules():
        if isinstance(module, BATCHNORMS) and module.weight is not None:
            block = owner.get(id(module.weight))
            if block is not None:
                found.setdefault(block, []).append(module)
    return found
