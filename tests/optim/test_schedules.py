"""Schedules: values at chosen steps, each group's LR ratio preserved; optimizer/schedule registries."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.errors import RecipeError
from finetune.optim import OptimizerConfig, ScheduleConfig
from finetune.optim.optimizers import build_optimizer
from finetune.optim.schedules import build_schedule


def run(config: ScheduleConfig, steps: int, lrs=(1.0, 0.25)) -> list[list[float]]:
    """The LR of each group at each of ``steps`` optimizer steps."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    schedule = build_schedule(optimizer, config, steps, "val/loss", "min")[0]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    return seen


def test_warmup_then_cosine_values_and_ratios():
    seen = run(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_ratio=0.1), steps=14)
    assert [s[0] for s in seen[:5]] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # 10 decay steps after warmup: step 9 is half way, cos(pi/2) = 0 -> 0.1 + 0.9 * 0.5
    assert seen[9][0] == pytest.approx(0.55)
    assert seen[13][0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    assert all(b == pytest.approx(a * 0.25) for a, b in seen)


def test_warmup_fraction_linear_constant_one_cycle():
    seen = run(ScheduleConfig(name="linear", warmup_fraction=0.2), steps=10)
    assert [s[0] for s in seen] == pytest.approx([0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert [s[1] for s in run(ScheduleConfig(), steps=3)] == [0.25] * 3
    cycle = [s[0] for s in run(ScheduleConfig(name="one_cycle"), steps=10)]
    assert cycle[0] == pytest.approx(0.04) and cycle[3] == pytest.approx(1.0)  # 30% warmup from lr/25


def test_plateau_lowers_every_group_together():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (1.0, 0.5)]
    optimizer = torch.optim.SGD(groups)
    configs = build_schedule(
        optimizer, ScheduleConfig(name="plateau", patience=0, factor=0.5), 10, "val/acc", "max"
    )
    assert configs[1]["monitor"] == "val/acc" and configs[1]["interval"] == "epoch"
    plateau = configs[1]["scheduler"]
    plateau.step(0.5)
    plateau.step(0.4)  # worse: drop
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]
    configs[0]["scheduler"].step()  # the per-step schedule keeps the drop
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.25]
    assert "schedule" not in plateau.state_dict() and "shape" not in configs[0]["scheduler"].state_dict()


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "adamw8bit", "paged_adamw8bit"])
def test_optimizers_keep_group_lrs(name):
    pytest.importorskip("bitsandbytes") if "8bit" in name else None
    layer = torch.nn.Linear(4, 2)
    groups = [
        {"params": [layer.weight], "lr": 0.5, "weight_decay": 0.1},
        {"params": [layer.bias], "lr": 0.05, "weight_decay": 0.0},
    ]
    config = OptimizerConfig(name=name, momentum=0.9, nesterov=name == "sgd")
    optimizer = build_optimizer(groups, config)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.05]
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(layer.weight, weight)
    # The bias group has no weight decay, so its first step shows its own LR: Adam-family steps move each
    # element by lr (m / sqrt(v) = +-1 at step one); Nesterov SGD by lr * (1 + momentum) * grad.
    moved = (layer.bias.detach() - bias).abs()
    expected = 0.05 * 1.9 * layer.bias.grad.abs() if name == "sgd" else torch.full_like(moved, 0.05)
    assert torch.allclose(moved, expected, rtol=1e-3)


def test_bad_names_and_values():
    with pytest.raises(RecipeError, match=r"optimizer.name: unknown optimizer 'lion'.*adamw.*sgd"):
        OptimizerConfig(name="lion")
    with pytest.raises(
        RecipeError, match=r"lr_scheduler.name: unknown LR schedule 'cos'; choose one of: constant"
    ):
        ScheduleConfig(name="cos")
    with pytest.raises(RecipeError, match="lr_scheduler.warmup_steps: give warmup_steps or warmup_fraction"):
        ScheduleConfig(warmup_steps=3, warmup_fraction=0.1)
    with pytest.raises(RecipeError, match="optimizer.layer_decay"):
        OptimizerConfig(layer_decay=1.5)
    with pytest.raises(RecipeError, match="optimizer.nesterov"):
        OptimizerConfig(name="sgd", momentum=0, nesterov=True)
    with pytest.raises(RecipeError, match="optimizer.groups: pattern '\\(' is not a valid regex"):
        OptimizerConfig(groups=[{"pattern": "("}])
