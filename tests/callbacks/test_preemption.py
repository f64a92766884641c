"""Preemption: SIGTERM (or SIGUSR1) during training saves a resumable checkpoint mid-epoch and exits with
143; resuming it with ``--ckpt_path last`` ends with the same weights as a run never interrupted."""

from __future__ import annotations

import lightning.pytorch  # noqa: F401  (binds Lightning's log handler to the real stderr, before capsys swaps it)
import pytest
import torch

from finetune.cli import PREEMPTED, main
from tests.helpers.recipes import text_recipe, write


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_mid_epoch_and_the_resumed_run_ends_like_an_uninterrupted_one(
    tiny_bert_dir, text_csv, tmp_path, signal_name, caplog
):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"]["max_epochs"] = 2
    recipe["data"]["init_args"]["batch_size"] = 8  # 40 train rows: 5 steps per epoch
    assert main([str(write(recipe, tmp_path / "straight.yaml"))]) == 0

    signal_at = {
        "class_path": "tests.helpers.signals.SignalAt",
        "init_args": {"step": 7, "signal_name": signal_name},
    }
    recipe["trainer"]["callbacks"] = [signal_at]
    preempted = write(recipe, tmp_path / "preempted.yaml")
    with caplog.at_level("WARNING", logger="finetune"):
        assert main([str(preempted)]) == PREEMPTED
    assert "Preempted at step 8" in caplog.text  # the batch of step 7 finished, then it stopped
    run = tmp_path / "runs" / "preempted"
    saved = torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (8, 1)  # mid-epoch: the 3rd of 5 steps of epoch 1

    recipe["trainer"]["callbacks"] = []
    assert main([str(write(recipe, tmp_path / "preempted.yaml")), "--ckpt_path=last"]) == 0
    straight = tmp_path / "runs" / "straight" / "version_0" / "checkpoints" / "last.ckpt"
    expected = torch.load(straight, weights_only=True)
    resumed = torch.load(run / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == expected["global_step"] == 10
    for name, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
