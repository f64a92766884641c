"""The recipe's ``optimizer:`` and ``lr_scheduler:`` sections as typed, validated dataclasses.

Torch-free, so recipes validate (and ``--help`` renders) without building anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from finetune.errors import RecipeError, require

OPTIMIZER_KEY = "optimizer"
SCHEDULE_KEY = "lr_scheduler"


@dataclass
class ParamGroup:
    """Parameters whose names match ``pattern`` train with their own LR and/or weight decay.

    Args:
        pattern: matched against parameter names relative to the model (``bert.encoder.layer.0.attention...``).
        syntax: ``regex`` (``re.search``: anchor with ``^``/``$`` to match whole names) or ``glob``
            (``fnmatch`` on the whole name, ``*`` crosses dots).
        lr: absolute learning rate of the group; default: the LR the parameter would otherwise get (base
            LR, or its layer-wise decayed LR).
        weight_decay: the group's weight decay; default: the optimizer's rule (none on biases/norms/embeddings).
    """

    pattern: str
    syntax: Literal["regex", "glob"] = "regex"
    lr: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        key = f"{OPTIMIZER_KEY}.groups"
        require(self.syntax in ("regex", "glob"), key, f"syntax {self.syntax!r} is not 'regex' or 'glob'")
        if self.syntax == "regex":
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise RecipeError(key, f"pattern {self.pattern!r} is not a valid regex ({error})") from None
        require(self.lr is None or self.lr >= 0, key, f"lr of {self.pattern!r} must be >= 0")
        require(
            self.weight_decay is None or self.weight_decay >= 0,
            key,
            f"weight_decay of {self.pattern!r} must be >= 0",
        )


@dataclass
class OptimizerConfig:
    """Which optimizer, and how the trainable parameters are grouped into learning rates.

    Args:
        name: a registered optimizer: ``adamw``, ``adam``, ``sgd``, ``adamw8bit``, ``paged_adamw``,
            ``paged_adamw8bit`` (the last three need bitsandbytes).
        lr: base learning rate: the head's LR, and every parameter's LR without ``layer_decay``/``groups``.
        weight_decay: weight decay of the parameters that decay (see ``decay_norm_and_bias``).
        betas: Adam-family moment coefficients.
        eps: Adam-family epsilon.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum (needs ``momentum > 0``).
        groups: parameter groups by name pattern, first match wins; unmatched parameters keep the rule below.
        layer_decay: layer-wise LR decay: the head (and what sits above the last block) gets ``lr``, block
            ``i`` of ``n`` gets ``lr * layer_decay ** (n - i)``, embeddings/stem the lowest. None: off.
        decay_norm_and_bias: also apply weight decay to biases, normalisation weights and embeddings
            (off by default, the usual fine-tuning practice).
    """

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    nesterov: bool = False
    groups: list[ParamGroup] = field(default_factory=list)
    layer_decay: float | None = None
    decay_norm_and_bias: bool = False

    def __post_init__(self) -> None:
        from finetune.optim.optimizers import OPTIMIZERS

        OPTIMIZERS.get(self.name)  # unknown name: RecipeError listing the valid ones
        key = OPTIMIZER_KEY
        require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(
            all(0 <= b < 1 for b in self.betas), f"{key}.betas", f"each must be in [0, 1), got {self.betas}"
        )
        require(self.momentum >= 0, f"{key}.momentum", f"must be >= 0, got {self.momentum}")
        require(not self.nesterov or self.momentum > 0, f"{key}.nesterov", "needs momentum > 0; set momentum")
        require(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            f"{key}.layer_decay",
            f"must be in (0, 1], got {self.layer_decay}",
        )
        self.betas = tuple(self.betas)
        self.groups = [g if isinstance(g, ParamGroup) else ParamGroup(**g) for g in self.groups]


@dataclass
class ScheduleConfig:
    """How the learning rate moves, per optimizer step. Every group keeps its own LR ratio to the others.

    Args:
        name: ``constant``, ``cosine``, ``linear`` (to ``min_lr_ratio`` at the last step), ``one_cycle``
            (warmup from ``lr * start_lr_ratio``, default over 30% of the steps, then cosine), or
            ``plateau`` (multiply by ``factor`` when ``monitor`` stops improving for ``patience`` epochs).
        warmup_steps: linear warmup over this many optimizer steps.
        warmup_fraction: linear warmup over this fraction of all optimizer steps (instead of ``warmup_steps``).
        min_lr_ratio: the floor of ``cosine``/``linear``/``one_cycle`` (and of ``plateau``), relative to each
            group's LR.
        start_lr_ratio: where warmup starts, relative to each group's LR (``one_cycle`` default: 1/25).
        factor: ``plateau``: the LR multiplier on a plateau.
        patience: ``plateau``: epochs without improvement before the LR drops.
        monitor: ``plateau``: the logged metric to watch; default: the task's checkpoint metric.
    """

    name: str = "constant"
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    min_lr_ratio: float = 0.0
    start_lr_ratio: float | None = None
    factor: float = 0.1
    patience: int = 2
    monitor: str | None = None

    def __post_init__(self) -> None:
        from finetune.optim.shapes import SCHEDULES

        SCHEDULES.get(self.name)
        key = SCHEDULE_KEY
        require(self.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(
            self.warmup_fraction is None or 0 <= self.warmup_fraction < 1,
            f"{key}.warmup_fraction",
            f"must be in [0, 1), got {self.warmup_fraction}",
        )
        require(
            not (self.warmup_steps and self.warmup_fraction is not None),
            f"{key}.warmup_steps",
            "give warmup_steps or warmup_fraction, not both",
        )
        require(
            0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}"
        )
        require(
            self.start_lr_ratio is None or 0 <= self.start_lr_ratio <= 1,
            f"{key}.start_lr_ratio",
            f"must be in [0, 1], got {self.start_lr_ratio}",
        )
        require(0 < self.factor < 1, f"{key}.factor", f"must be in (0, 1), got {self.factor}")
        require(self.patience >= 0, f"{key}.patience", f"must be >= 0, got {self.patience}")
