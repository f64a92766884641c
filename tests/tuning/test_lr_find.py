"""``python -m finetune lr-find``: Lightning's LR finder with every parameter group scaled together, a plot,
the override to pass, no run folder, the weights as they were."""

from __future__ import annotations

import math
import re

import pytest
import torch

from finetune.cli import main
from tests.helpers.recipes import text_recipe, write

# Layer-wise decay over the 2 blocks and a pattern group with its own LR: five LR ratios to optimizer.lr.
RATIOS = [0.125, 0.25, 0.5, 1.0, 2.0]


def lr_recipe(tiny_bert_dir, text_csv, tmp_path):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs", limit=40)  # 20 training rows
    recipe["trainer"]["max_epochs"] = 1
    recipe["model"]["init_args"]["labels"] = ["negative", "positive"]  # the model builds without a trainer
    recipe["optimizer"] = {
        "name": "adamw",
        "lr": 0.01,
        "layer_decay": 0.5,
        "groups": [{"pattern": "^classifier", "lr": 0.02}],
    }
    return write(recipe, tmp_path / "tiny.yaml")


def test_lr_find_prints_the_overrides_writes_the_plot_and_no_run(tiny_bert_dir, text_csv, tmp_path, capsys):
    path = lr_recipe(tiny_bert_dir, text_csv, tmp_path)
    argv = ["lr-find", str(path), "--batch-size-find", "--steps", "15", "--min-lr=1e-5", "--max-lr", "0.1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # The batch-size finder doubled the recipe's 4: no memory limit on a CPU, only the training split's size.
    assert int(re.search(r"--data\.init_args\.batch_size=(\d+)", out).group(1)) > 4
    suggestion = float(re.search(r"--optimizer\.lr=(\S+)", out).group(1))
    assert math.isfinite(suggestion) and 1e-5 <= suggestion <= 0.1
    # The pattern group's own LR moves with the base LR: twice the suggestion, as 0.02 was twice 0.01.
    groups = re.search(r"--optimizer\.groups=(\[.*\])", out).group(1)
    assert float(re.search(r'"lr": ([^,}]+)', groups).group(1)) == pytest.approx(2 * suggestion)
    folder = tmp_path / "runs" / "tiny" / "lr_find"
    assert (folder / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    rows = (folder / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss" and 12 <= len(rows) - 1 <= 15  # fewer when the loss diverged
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["lr_find"]  # no version_N
    assert not list((tmp_path / "runs").rglob("*.ckpt"))  # Lightning's restore point is gone too


def test_every_group_keeps_its_ratio_and_the_weights_are_restored(tiny_bert_dir, text_csv, tmp_path):
    from finetune.cli.lightning import run_cli
    from finetune.optim import OptimizerConfig, param_groups
    from finetune.tuning.lr_find import find_lr, scaled_optimizer

    path = lr_recipe(tiny_bert_dir, text_csv, tmp_path)
    cli = run_cli(["--config", str(path)], run=False, plan=True)
    task = cli.model
    task.configure_model()
    before = {name: tensor.clone() for name, tensor in task.state_dict().items()}
    search = find_lr(cli.trainer, task, cli.datamodule, base_lr=0.01, min_lr=1e-5, max_lr=0.1, steps=15)

    assert all(torch.equal(before[name], tensor) for name, tensor in task.state_dict().items())
    assert sorted({round(ratio, 6) for ratio in search.ratios}) == RATIOS
    # Every step trained each group at the searched base LR times the group's ratio.
    assert len(search.applied) == len(search.lrs) >= 12
    for used, base in zip(search.applied, search.lrs):
        assert used == pytest.approx([base * ratio for ratio in search.ratios])
    # Applying the suggestion to the recipe gives every group the suggestion times its ratio.
    assert search.suggestion is not None and math.isfinite(search.suggestion)
    config = scaled_optimizer(OptimizerConfig(**cli.config.optimizer.as_dict()), search.suggestion)
    applied = [group["lr"] for group in param_groups(task.model, task.layout, config)]
    assert applied == pytest.approx(search.group_lrs(search.suggestion))


def test_bad_range_is_one_line_before_anything_is_built(tiny_bert_dir, text_csv, tmp_path, capsys):
    path = lr_recipe(tiny_bert_dir, text_csv, tmp_path)
    assert main(["lr-find", str(path), "--min-lr", "0.1", "--max-lr", "0.01"]) == 2
    assert main(["lr-find", str(path), "--steps", "many"]) == 2
    assert main(["lr-find"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("finetune: error: --min-lr: give 0 < min-lr < max-lr")
    assert lines[1].startswith("finetune: error: lr-find:") and "steps" in lines[1]
    assert lines[2].startswith("finetune: error: lr-find: give a recipe")
    assert not (tmp_path / "runs").exists()
