"""The recipe's ``trainer`` values that Lightning would accept and fail on later (a division by zero at the
first step, a clip that never clips), or refuse with a traceback, checked when the recipe loads."""

from __future__ import annotations

import difflib
from typing import Any

from finetune.errors import RecipeError, require

KEY = "trainer"


def check_trainer(trainer: Any) -> None:
    """RecipeError naming the ``trainer.X`` key for values that cannot work; ``trainer`` is the parsed section."""
    accumulate = trainer.accumulate_grad_batches
    require(
        isinstance(accumulate, int) and accumulate >= 1,
        f"{KEY}.accumulate_grad_batches",
        f"must be 1 or more, got {accumulate}",
    )
    for name in ("max_epochs", "max_steps"):
        value = trainer[name]
        require(
            value is None or value >= -1, f"{KEY}.{name}", f"must be 0 or more (-1: no limit), got {value}"
        )
    clip = trainer.gradient_clip_val
    require(
        clip is None or clip >= 0,
        f"{KEY}.gradient_clip_val",
        f"must be 0 or more (unset: no clipping), got {clip}",
    )
    algorithm = trainer.gradient_clip_algorithm
    require(
        algorithm in (None, "norm", "value"),
        f"{KEY}.gradient_clip_algorithm",
        f"{algorithm!r} is not 'norm' or 'value'",
    )
    _check_accelerator(trainer.accelerator)
    _check_strategy(trainer.strategy)


def _check_accelerator(accelerator: Any) -> None:
    if accelerator in ("gpu", "cuda"):
        import torch

        require(
            torch.cuda.is_available(),
            f"{KEY}.accelerator",
            f"{accelerator!r} but no CUDA GPU is visible here; use auto (GPU when there is one) or cpu",
        )


def _check_strategy(strategy: Any) -> None:
    if not isinstance(strategy, str):
        return  # a class_path: jsonargparse has imported and checked it
    from lightning.pytorch.strategies import StrategyRegistry

    known = ["auto", *StrategyRegistry.available_strategies()]
    if strategy not in known:
        close = difflib.get_close_matches(strategy, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of: {', '.join(sorted(known))}"
        raise RecipeError(f"{KEY}.strategy", f"unknown strategy {strategy!r}; {hint}")
