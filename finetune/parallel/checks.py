"""Combinations of a Lightning strategy with finetune's callbacks and fine-tuning strategies that cannot work,
refused in one line when a recipe loads, before any process starts or any weight is read."""

from __future__ import annotations

from finetune.errors import RecipeError
from finetune.parallel.placement import Placement


def check_combination(placement: Placement, callbacks: list[str], fine_tuning: str) -> None:
    """``callbacks`` are the recipe's callback class names, ``fine_tuning`` the strategy's registered name
    (``qlora`` ...)."""
    deepspeed = placement.strategy.lower().startswith("deepspeed")
    if deepspeed and "ScheduledAccumulation" in callbacks:
        raise RecipeError(
            "trainer.callbacks.ScheduledAccumulation",
            "DeepSpeed fixes gradient accumulation in its config; use trainer.accumulate_grad_batches",
        )
    if deepspeed and fine_tuning == "qlora" and placement.sharded[0]:
        raise RecipeError(
            "model.strategy",
            "ZeRO-3 cannot partition bitsandbytes 4-bit weights; use trainer.strategy: fsdp2 with "
            "quant_storage set to the compute dtype, or deepspeed_stage_2",
        )
