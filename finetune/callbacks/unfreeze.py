"""Gradual unfreezing (ULMFiT): the head trains from the start, blocks join top-down at milestones."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy
from torch import nn
from typing_extensions import override

from finetune.errors import RecipeError
from finetune.optim.groups import level_label, parameter_levels
from finetune.optim.network import model_layout
from finetune.optim.schedules import GroupSchedule
from finetune.strategies.base import BATCHNORMS

log = logging.getLogger(__name__)

KEY = "trainer.callbacks.GradualUnfreezing"


class GradualUnfreezing(pl.Callback):
    """Open the blocks of the pretrained network top-down, one (or ``blocks_per_milestone``) per milestone.

    Works on finetune's tasks and, unchanged, on your own ``LightningModule`` with its own optimizer. The
    head and what sits above the last block train from the start; the embeddings/stem open last; what is
    frozen when the run starts stays frozen. A block opens at the LR its optimizer gives it (layer-wise
    decay included), ramping over ``warmup_steps``, with fresh optimizer state.

    Where the blocks are: optimizer groups built by ``finetune.optim.param_groups`` (every ``FinetuneTask``;
    your ``configure_optimizers`` may use it too) name their ``level`` and ``block``. Other optimizers'
    parameters are laid out by the network ``module`` of your module (timm ``group_matcher``, Hugging
    Face repeated layers); the rest of your module (your head) trains from the start.

    How a closed block is held still: under finetune's LR schedule (``finetune.optim.GroupSchedule``, any
    ``FinetuneTask``'s) each block's groups have an LR *gate*, 0 while closed, ramping to 1 once open. Any
    other optimizer is left exactly as you built it (type, hyper-parameters, groups, your LR scheduler):
    a closed block's gradients are dropped before each step (torch optimizers skip parameters without a
    gradient: no update, no weight decay, no state), and during warmup an opening block moves by the ramp
    times its step (for AdamW, Adam, SGD and the others whose state does not depend on the LR, exactly the
    step at the ramped LR). Unlike Lightning's ``BaseFinetuning``, which adds parameter groups when blocks
    open, the optimizer holds every parameter from the start: its groups and state have the same shape
    in every run, so a run resumed after a milestone loads them as saved, and your scheduler (one base LR
    per group) stays right.

    On one device a closed block also has ``requires_grad=False`` (no backward cost). Under DDP, FSDP2 or
    DeepSpeed, which cannot follow ``requires_grad`` changes mid-run, closed blocks keep computing gradients
    and only the gate holds them, so the set of trained parameters never changes and DDP's defaults
    (``find_unused_parameters=False``) are right. DeepSpeed owns the gradients, so there only finetune's
    LR gates can hold a block. Closed BatchNorm layers stay in eval mode. State (which block opened at which
    optimizer step) is saved by block name, so a resumed run re-opens exactly what was open and nothing else.

    Args:
        milestones: epochs (or optimizer steps, with ``interval="step"``) at which the next blocks open.
        every: instead of ``milestones``: open the next blocks every ``every`` epochs/steps.
        interval: ``epoch`` or ``step``.
        blocks_per_milestone: how many blocks open at each milestone.
        warmup_steps: a newly opened block's LR (with your own optimizer: its step) ramps linearly to its
            full value over this many steps.
        module: your own module's attribute holding the pretrained network (``"net"``; dots go deeper);
            default: the child holding most of the parameters. Not needed with finetune's groups.

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
        module: str | None = None,
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
        self.module = module
        self.opened: dict[str, int] = {}  # block name -> optimizer step at which it opened
        self.order: list[str] = []  # blocks to open, top-down
        self.params: dict[str, list[nn.Parameter]] = {}  # their trained parameters
        self._held: set[int] = set()  # parameters this callback set requires_grad=False on
        self.gates: dict[str, float] = {}
        self._warming: list[tuple[nn.Parameter, torch.Tensor, float]] = []
        self._hooks: list[Any] = []

    # -- schedule --------------------------------------------------------------------------------------

    def milestones_passed(self, position: int) -> int:
        """How many milestones lie at or before epoch/step ``position``."""
        if self.every is not None:
            return position // self.every
        return sum(1 for milestone in self.milestones if milestone <= position)

    def due(self, position: int) -> list[str]:
        """The blocks that are open at epoch/step ``position``."""
        return self.order[: self.milestones_passed(position) * self.blocks_per_milestone]

    def opens_at(self, index: int) -> str | None:
        """When the ``index``-th block to open (0: the top one) opens: ``epoch N`` / ``step N``; None: never."""
        milestone = index // self.blocks_per_milestone
        if self.every is not None:
            return f"{self.interval} {self.every * (milestone + 1)}"
        if milestone < len(self.milestones):
            return f"{self.interval} {self.milestones[milestone]}"
        return None

    def blocks(
        self, optimizers: list[torch.optim.Optimizer], pl_module: nn.Module
    ) -> dict[str, list[nn.Parameter]]:
        """The blocks to open, top-down, with their parameters in ``optimizers`` that train: from finetune's
        groups when every group has its ``level``, else from the layout of ``pl_module``'s network."""
        groups = [g for optimizer in optimizers for g in optimizer.param_groups]
        if groups and all("level" in g for g in groups):
            return _blocks_of_groups(groups)
        trains = {id(p) for g in groups for p in g["params"] if p.requires_grad or id(p) in self._held}
        return _blocks_of_layout(groups, pl_module, self.module, trains)

    # -- hooks -----------------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.params = self.blocks(trainer.optimizers, pl_module)
        self.order = list(self.params)
        self.schedule = _group_schedule(trainer)
        if self.schedule is None:
            _check_gradients_can_drop(trainer)
        # Several processes (DDP, FSDP2) or an engine that owns the parameters (DeepSpeed): never change
        # requires_grad mid-run; the gates alone hold closed blocks.
        self.gate_only = not isinstance(trainer.strategy, SingleDeviceStrategy)
        self.batchnorms = _batchnorms_by_block(pl_module, self.params)
        for block in self.order:
            self._set_trainable(block, block in self.opened)
        self._update(trainer)
        if self.schedule is None:
            self._hooks = [
                optimizer.register_step_post_hook(self._after_step) for optimizer in trainer.optimizers
            ]
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
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.schedule is not None:
            return  # the LR gates hold the blocks
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._warming = []
        for block in self.order:
            gate = self.gates[block]
            for parameter in self.params[block]:
                if id(parameter) not in stepped or parameter.grad is None:
                    continue
                if gate == 0:
                    parameter.grad = None  # before clipping, so the gradient norm is the open blocks' alone
                elif gate < 1:
                    self._warming.append((parameter, parameter.detach().clone(), gate))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"opened": dict(self.opened)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.opened = dict(state_dict["opened"])

    # -- helpers ---------------------------------------------------------------------------------------

    def _update(self, trainer: pl.Trainer) -> None:
        """Open due blocks; set every block's gate for the coming optimizer step."""
        position = trainer.current_epoch if self.interval == "epoch" else trainer.global_step
        for block in self.due(position):
            if block not in self.opened:
                self.opened[block] = trainer.global_step
                self._set_trainable(block, True)
                self._reset_state(trainer, block)
                for module in self.batchnorms.get(block, ()):
                    module.train(trainer.lightning_module.training)
                log.info("Gradual unfreezing: %s opens at step %d", block, trainer.global_step)
        self.gates = {block: self._gate(block, trainer.global_step) for block in self.order}
        if self.schedule is not None:
            for block, gate in self.gates.items():
                for group in _groups(trainer, block):
                    group["gate"] = gate
            self.schedule.refresh()

    def _gate(self, block: str, step: int) -> float:
        if block not in self.opened:
            return 0.0
        if not self.warmup_steps:
            return 1.0
        return min(1.0, (step - self.opened[block] + 1) / self.warmup_steps)

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """An opening block moves by its gate times the step the optimizer took."""
        for parameter, before, gate in self._warming:
            parameter.copy_(torch.lerp(before, parameter, gate))
        self._warming = []

    def _release(self) -> None:
        """After the run: no hooks left on the optimizer, and closed blocks trainable again, as they came."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._warming = [], []
        for block in self.order:
            if block not in self.opened:
                self._set_trainable(block, True)

    def _set_trainable(self, block: str, trainable: bool) -> None:
        if self.gate_only:
            return
        for parameter in self.params[block]:
            parameter.requires_grad_(trainable)
            (self._held.discard if trainable else self._held.add)(id(parameter))

    def _reset_state(self, trainer: pl.Trainer, block: str) -> None:
        """A block joins with fresh optimizer state (under DDP it saw gradients while its gate was shut)."""
        for optimizer in trainer.optimizers:
            for parameter in self.params[block]:
                optimizer.state.pop(parameter, None)


def _group_schedule(trainer: pl.Trainer) -> GroupSchedule | None:
    """finetune's LR schedule when it schedules finetune's groups (the LR gates need both), else None."""
    groups = [g for optimizer in trainer.optimizers for g in optimizer.param_groups]
    if not groups or not all("level" in g for g in groups):
        return None
    return next(
        (c.scheduler for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, GroupSchedule)), None
    )


def _check_gradients_can_drop(trainer: pl.Trainer) -> None:
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise RecipeError(
            KEY,
            "DeepSpeed owns the gradients, so only finetune's LR gates can hold closed blocks: use a finetune "
            "task, or train your module with ddp or fsdp2",
        )


def _blocks_of_groups(groups: list[dict[str, Any]]) -> dict[str, list[nn.Parameter]]:
    """Blocks by finetune's group keys: every level below the head's, top-down."""
    top = max(g["level"] for g in groups)
    levels = sorted({g["level"] for g in groups if g["level"] < top}, reverse=True)
    return {
        next(g["block"] for g in groups if g["level"] == level): [
            p for g in groups if g["level"] == level for p in g["params"]
        ]
        for level in levels
    }


def _blocks_of_layout(
    groups: list[dict[str, Any]], pl_module: nn.Module, module: str | None, trains: set[int]
) -> dict[str, list[nn.Parameter]]:
    """Blocks by the layout of ``pl_module``'s network: the parameters of ``groups`` that train (ids in
    ``trains``) in each."""
    model, layout = model_layout(pl_module, module, f"{KEY}.module")
    own = {id(p) for p in pl_module.parameters()}
    foreign = sum(1 for g in groups for p in g["params"] if id(p) not in own)
    if foreign:
        raise RecipeError(
            KEY,
            f"the optimizer holds {foreign} parameters that are not {type(pl_module).__name__}'s own (flattened "
            "by the strategy?); train with ddp or fsdp2, whose optimizers hold the module's parameters",
        )
    if not layout.blocks:
        raise RecipeError(
            f"{KEY}.module",
            f"finds no blocks in {type(pl_module).__name__}'s network; name the module that has them",
        )
    levels = parameter_levels(model, layout)
    level_of = {id(p): levels[name] for name, p in model.named_parameters()}
    top = len(layout.blocks) + 1
    found: dict[int, list[nn.Parameter]] = {}
    for group in groups:
        for parameter in group["params"]:
            level = level_of.get(id(parameter), top)  # outside the laid-out model: trains from the start
            if level < top and id(parameter) in trains:
                found.setdefault(level, []).append(parameter)
    return {level_label(layout, level): found[level] for level in sorted(found, reverse=True)}


def _groups(trainer: pl.Trainer, block: str) -> list[dict[str, Any]]:
    """The block's groups, looked up by name each time: loading optimizer state replaces the group dicts."""
    return [g for optimizer in trainer.optimizers for g in optimizer.param_groups if g.get("block") == block]


def _batchnorms_by_block(
    pl_module: nn.Module, params: dict[str, list[nn.Parameter]]
) -> dict[str, list[nn.Module]]:
    """BatchNorm modules whose parameters sit in each block."""
    owner = {id(p): block for block, block_params in params.items() for p in block_params}
    found: dict[str, list[nn.Module]] = {}
    for module in pl_module.modules():
        if isinstance(module, BATCHNORMS) and module.weight is not None:
            block = owner.get(id(module.weight))
            if block is not None:
                found.setdefault(block, []).append(module)
    return found
