"""Optimizers by name: a registry of builders ``(param_groups, config) -> torch.optim.Optimizer``.

Builders import their libraries when called, so naming an optimizer in a recipe stays cheap to validate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from finetune.errors import RecipeError
from finetune.registry import Registry

Builder = Callable[[list[dict[str, Any]], Any], Any]

OPTIMIZERS: Registry[Builder] = Registry("optimizer", "optimizer.name")


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], config: Any) -> Any:
    import torch

    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], config: Any) -> Any:
    """Adam with L2 weight decay added to the gradient (use ``adamw`` for decoupled decay)."""
    import torch

    return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], config: Any) -> Any:
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

    build.__doc__ = f"bitsandbytes ``{class_name}`` (8-bit and/or paged optimizer state)."
    return build


OPTIMIZERS.register("adamw8bit")(_bitsandbytes("AdamW8bit"))
OPTIMIZERS.register("paged_adamw")(_bitsandbytes("PagedAdamW"))
OPTIMIZERS.register("paged_adamw8bit")(_bitsandbytes("PagedAdamW8bit"))

# Bytes of optimizer state per trainable parameter element, for the run plan's memory estimate.
STATE_BYTES: dict[str, float] = {
    "adamw": 8.0,
    "adam": 8.0,
    "sgd": 4.0,
    "adamw8bit": 2.0,
    "paged_adamw": 8.0,
    "paged_adamw8bit": 2.0,
}


def build_optimizer(groups: list[dict[str, Any]], config: Any) -> Any:
    """The optimizer ``config.name`` over ``groups`` (each group's own ``lr``/``weight_decay`` win)."""
    return OPTIMIZERS.get(config.name)(groups, config)


def state_bytes(config: Any) -> float:
    """Optimizer-state bytes per trainable element (fp32 parameters); SGD without momentum keeps none."""
    if config.name == "sgd" and config.momentum == 0:
        return 0.0
    return STATE_BYTES.get(config.name, 8.0)
