"""The run plan: ``python -m finetune plan``, the table at the start of every run, the memory estimate."""

from __future__ import annotations

import logging

import pytest
import torch

from finetune.cli import main
from finetune.memory import BACKWARD_FACTOR, activation_bytes, estimate_memory
from tests.helpers.recipes import text_recipe, write


def tiny_recipe(tiny_bert_dir, text_csv, tmp_path):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"]["max_epochs"] = 1
    recipe["data"]["init_args"]["batch_size"] = 8  # 40 train rows: 5 optimizer steps
    recipe["trainer"]["callbacks"] = [
        {"class_path": "finetune.callbacks.GradualUnfreezing", "init_args": {"every": 2, "interval": "step"}}
    ]
    recipe["optimizer"] = {"name": "adamw", "lr": 0.01, "layer_decay": 0.5}
    recipe["lr_scheduler"] = {"name": "cosine", "warmup_steps": 1}
    return recipe


def test_plan_prints_groups_blocks_schedule_memory_and_trains_nothing(
    tiny_bert_dir, text_csv, tmp_path, caplog
):
    path = write(tiny_recipe(tiny_bert_dir, text_csv, tmp_path), tmp_path / "tiny.yaml")
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert main(["plan", str(path)]) == 0
    text = caplog.text
    for expected in (
        "Parameter groups",
        "bert.encoder.layer.0 (no decay)",
        "2.50e-03",  # layer.0 of 2 blocks: 0.01 * 0.5 ** 2
        "trains from",
        "step 2",
        "optimizer steps: 5 (warmup 1)",
        "optimizer state",
        "activations saved for backward (one micro-batch)",
        f"backward working memory ({BACKWARD_FACTOR:g}x the saved activations)",
        "libraries and data in this process (measured now)",  # on CPU
    ):
        assert expected in text, expected
    assert not (tmp_path / "runs").exists()  # no run folder, no checkpoint, no export


def test_bad_names_exit_2_with_one_line(tiny_bert_dir, text_csv, tmp_path, capsys):
    recipe = tiny_recipe(tiny_bert_dir, text_csv, tmp_path)
    recipe["optimizer"]["name"] = "lion"
    assert main([str(write(recipe, tmp_path / "bad.yaml"))]) == 2
    recipe["optimizer"]["name"] = "adamw"
    recipe["lr_scheduler"]["name"] = "cosin"
    assert main(["plan", str(write(recipe, tmp_path / "bad2.yaml"))]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2].startswith(
        "finetune: error: optimizer.name: unknown optimizer 'lion'; choose one of: adam,"
    )
    assert lines[-1].startswith("finetune: error: lr_scheduler.name: unknown LR schedule 'cosin'")
    assert main(["plan"]) == 2


@pytest.mark.slow
def test_every_run_saves_the_plan(tiny_bert_dir, text_csv, tmp_path):
    recipe = tiny_recipe(tiny_bert_dir, text_csv, tmp_path)
    assert main([str(write(recipe, tmp_path / "tiny.yaml"))]) == 0
    plan = (tmp_path / "runs" / "tiny" / "version_0" / "plan.txt").read_text()
    assert "Parameter groups" in plan and "Training memory per device" in plan


def test_memory_estimate_counts_and_leaves_no_trace():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20), torch.nn.Linear(20, 3))
    model[2].requires_grad_(False)
    x = torch.randn(8, 10)
    before = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    activations = activation_bytes(model, lambda: model(x), "32-true", torch.device("cpu"))
    assert activations >= 8 * 20 * 4  # at least one saved (8, 20) fp32 tensor
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.equal(rng, torch.get_rng_state())
    estimate = estimate_memory(model, "32-true", 8.0, activations)
    assert estimate.backward == int(activations * BACKWARD_FACTOR)
    trainable = 10 * 20 + 20 + 2 * 20
    assert estimate.weights == (trainable + 20 * 3 + 3) * 4
    assert estimate.gradients == trainable * 4
    assert estimate.optimizer_state == trainable * 8
    assert estimate.total == sum(
        (estimate.weights, estimate.gradients, estimate.optimizer_state, activations, estimate.backward)
    )
    assert estimate_memory(model, "bf16-true", 8.0, None).weights == estimate.weights // 2


def test_plan_marks_frozen_blocks_as_never_training(tiny_bert_dir, text_csv, tmp_path, caplog):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["model"]["init_args"]["strategy"] = "freeze"
    path = write(recipe, tmp_path / "freeze.yaml")
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert main(["plan", str(path)]) == 0
    rows = {
        line.split()[0]: line for line in caplog.text.splitlines() if line.startswith(("embeddings", "head "))
    }
    assert rows["embeddings"].rstrip().endswith("never (frozen)")
    assert rows["head"].rstrip().endswith("start")


def memory_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.split("Training memory per device (estimate)")[-1].splitlines():
        for name in ("weights", "gradients", "optimizer state"):
            if line.startswith(name + " "):
                rows[name] = line[len(name) :].strip()
    return rows


def test_plan_divides_memory_by_the_recipes_sharding(tiny_bert_dir, text_csv, tmp_path, caplog):
    """The plan builds on one device but reports per device for the recipe's world: fsdp2 over 4 processes
    holds a quarter of everything, ZeRO-2 over 2 nodes x 2 devices a quarter of gradients and optimizer state."""
    path = write(tiny_recipe(tiny_bert_dir, text_csv, tmp_path), tmp_path / "tiny.yaml")

    def plan(*overrides: str) -> tuple[dict[str, float], str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="finetune"):
            assert main(["plan", str(path), *overrides]) == 0
        rows = memory_rows(caplog.text)
        assert all(value.endswith("KiB") for value in rows.values()), rows
        return {name: float(value.split()[0]) for name, value in rows.items()}, caplog.text

    alone, text = plan()
    assert "strategy auto, 1 process(es): replicated on every device" in text
    sharded, text = plan("--trainer.strategy=fsdp2", "--trainer.devices=4")
    assert "strategy fsdp2, 4 process(es): weights, gradients, optimizer state sharded over 4" in text
    for name, size in alone.items():
        assert sharded[name] == pytest.approx(size / 4, abs=0.1), name
    zero2, text = plan("--trainer.strategy=deepspeed_stage_2", "--trainer.devices=2", "--trainer.num_nodes=2")
    assert "sharded over 4" in text
    assert zero2["weights"] == alone["weights"]
    assert zero2["optimizer state"] == pytest.approx(alone["optimizer state"] / 4, abs=0.1)
    assert not (tmp_path / "runs").exists()


def test_probe_rows_cut_every_batch_tensor_and_scale_linearly(tiny_bert_dir):
    from collections import namedtuple

    from transformers import AutoModel

    from finetune.plan import _first_rows, _rows

    Pair = namedtuple("Pair", "images labels")
    batch = {
        "input_ids": torch.ones(8, 5, dtype=torch.long),
        "extra": [Pair(torch.zeros(8, 3), torch.arange(8))],
    }
    cut = _first_rows(batch, _rows(batch), 2)
    assert cut["input_ids"].shape == (2, 5)
    assert isinstance(cut["extra"][0], Pair) and cut["extra"][0].labels.tolist() == [0, 1]
    assert _rows({"scalar": torch.tensor(1.0), "x": (torch.zeros(4, 2),)}) == 4

    # Saved activations grow with the rows: the plan probes 2 rows and scales to the batch.
    model = AutoModel.from_pretrained(tiny_bert_dir)
    ids = torch.randint(0, model.config.vocab_size, (8, 12))
    mask = torch.ones_like(ids)
    mask[3, 7:] = 0

    def saved(rows: int) -> int:
        forward = lambda: model(input_ids=ids[:rows], attention_mask=mask[:rows]).last_hidden_state  # noqa: E731
        return activation_bytes(model, forward, "32-true", torch.device("cpu"))

    assert saved(2) * 4 == pytest.approx(saved(8), rel=0.05)
