"""Optimizers by name: a registry of ``OptimInfo`` entries, each with its builder and what the run plan
needs to know about it.

Builders import their libraries when called, so naming an optimizer in a recipe stays cheap to validate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.errors import RecipeError
from finetune.registry import Registry

Builder = Callable[[list[dict[str, Any]], Any], Any]  # (param_groups, OptimizerConfig) -> Optimizer


@dataclass(frozen=True)
class OptimInfo:
    """A registered optimizer.

    Args:
        name: the recipe's ``optimizer.name``.
        build: ``(param_groups, config) -> torch.optim.Optimizer``; each group's own ``lr``/``weight_decay`` win.
        state_bytes: optimizer-state bytes per trainable fp32 element (the plan's memory estimate).
        description: one line for documentation.
    """

    name: str
    build: Builder
    state_bytes: float
    description: str = ""


OPTIMIZERS: Registry[OptimInfo] = Registry("optimizer", "optimizer.name")


def register(info: OptimInfo) -> OptimInfo:
    """Add ``info`` to ``OPTIMIZERS`` under its name (a name already registered raises)."""
    return OPTIMIZERS.register(info.name)(info)


def _adamw(groups: list[dict[str, Any]], config: Any) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _adam(groups: list[dict[str, Any]], config: Any) -> Any:
    import torch

    return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _sgd(groups: list[dict[str, Any]], config: Any) -> Any:
    import torch

    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def _bitsandbytes(class_name: str) -> Builder:
    def build(groups: list[dict[str, Any]], config: Any) -> Any:
        try:
            import bitsandbytes.optim as bnb
        except ImportError:
            raise RecipeError(
                "optimizer.name", f"{class_name} needs bitsandbytes: pip install 'finetune[peft]'"
            ) from None
        return getattr(bnb, class_name)(groups, lr=config.lr, betas=config.betas, eps=config.eps)

    return build


register(OptimInfo("adamw", _adamw, 8.0, "AdamW, decoupled weight decay"))
register(OptimInfo("adam", _adam, 8.0, "Adam with L2 weight decay added to the gradient"))
register(OptimInfo("sgd", _sgd, 4.0, "SGD with momentum (no state without momentum)"))
register(OptimInfo("adamw8bit", _bitsandbytes("AdamW8bit"), 2.0, "bitsandbytes AdamW, 8-bit state"))
register(OptimInfo("paged_adamw", _bitsandbytes("PagedAdamW"), 8.0, "bitsandbytes AdamW, paged state"))
register(
    OptimInfo(
        "paged_adamw8bit", _bitsandbytes("PagedAdamW8bit"), 2.0, "bitsandbytes AdamW, paged 8-bit state"
    )
)


def build_optimizer(groups: list[dict[str, Any]], config: Any) -> Any:
    """The optimizer ``config.name`` over ``groups`` (each group's own ``lr``/``weight_decay`` win)."""
    return OPTIMIZERS.get(config.name).build(groups, config)


def state_bytes(config: Any) -> float:
    """Optimizer-state bytes per trainable element (fp32 parameters); SGD without momentum keeps none."""
    if config.name == "sgd" and config.momentum == 0:
        return 0.0
    return OPTIMIZERS.get(config.name).state_bytes
