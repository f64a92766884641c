"""How a recipe's trainer section maps to processes and sharding, and the combinations refused at load."""

from __future__ import annotations

import pytest

from finetune.errors import RecipeError
from finetune.parallel.checks import check_combination
from finetune.parallel.placement import FULL, GRADIENTS_AND_STATE, NOTHING, STATE, from_recipe


@pytest.mark.parametrize(
    ("strategy", "devices", "nodes", "world", "sharded"),
    [
        ("fsdp2", 8, 1, 8, FULL),
        ("fsdp", "4", 2, 8, FULL),
        ("deepspeed_stage_3_offload", [0, 1], 1, 2, FULL),
        ("deepspeed", 2, 1, 2, GRADIENTS_AND_STATE),  # Lightning's plain "deepspeed" is ZeRO stage 2
        (
            {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy", "init_args": {"stage": 1}},
            4,
            1,
            4,
            STATE,
        ),
        ({"class_path": "finetune.parallel.FSDP2Strategy", "init_args": {}}, 2, 1, 2, FULL),
        ("ddp", 8, 4, 32, NOTHING),
        ("fsdp2", 1, 1, 1, NOTHING),  # one process: nothing to shard over
    ],
)
def test_placement_from_recipe(strategy, devices, nodes, world, sharded):
    placement = from_recipe(strategy, devices, nodes)
    assert (placement.world_size, placement.sharded) == (world, sharded)


def test_unknown_device_count_is_assumed_one_and_said():
    placement = from_recipe("fsdp2", "auto", 1)
    assert placement.world_size == 1 and "--trainer.devices=N" in placement.describe()


def test_per_device_bytes_round_up():
    assert from_recipe("deepspeed_stage_2", 3, 1).per_device(100, 100, 100) == (100, 34, 34)


def test_refused_combinations_name_the_key():
    with pytest.raises(RecipeError, match="trainer.callbacks.ScheduledAccumulation: DeepSpeed fixes"):
        check_combination(from_recipe("deepspeed_stage_2", 2, 1), ["ScheduledAccumulation"], "full")
    with pytest.raises(RecipeError, match="model.strategy: ZeRO-3 cannot partition bitsandbytes"):
        check_combination(from_recipe("deepspeed_stage_3", 2, 1), [], "qlora")
    check_combination(from_recipe("deepspeed_stage_2", 2, 1), ["GradualUnfreezing"], "qlora")
    check_combination(from_recipe("fsdp2", 2, 1), ["ScheduledAccumulation"], "qlora")
