"""Gradual unfreezing: blocks move exactly from their milestones, at their layer-wise LR; resume; DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from finetune.callbacks import RestoreRNG
from finetune.callbacks.unfreeze import GradualUnfreezing
from finetune.errors import RecipeError
from tests.helpers.unfreeze_run import Changes, dataset, task, trainer

# BERT levels: embeddings 0, layer.0 1, layer.1 2, pooler + classifier 3 (head). Milestones at steps 1, 2, 3.
EXPECTED_CHANGED = [
    ["head"],
    ["head", "layer.1"],
    ["head", "layer.0", "layer.1"],
    ["embeddings", "head", "layer.0", "layer.1"],
]
FULL_LR = {"head": 0.01, "bert.encoder.layer.1": 0.005, "bert.encoder.layer.0": 0.0025, "embeddings": 0.00125}


def run(bert_dir, max_steps=4, ckpt_path=None, extra=()):
    changes, unfreezing = Changes(), GradualUnfreezing(milestones=[1, 2, 3], interval="step")
    fit = trainer(max_steps, [unfreezing, changes, RestoreRNG(), *extra], enable_checkpointing=bool(extra))
    model = task(bert_dir)
    # 2 batches per epoch: the checkpoint at step 2 closes an epoch (a plain DataLoader cannot resume mid-epoch)
    # Its own generator, as finetune's data modules do: making an iterator then draws nothing from the global
    # RNG, so the resumed run keeps the same dropout masks.
    loader = DataLoader(dataset(bert_dir, count=8), batch_size=4, generator=torch.Generator().manual_seed(0))
    fit.fit(model, loader, ckpt_path=ckpt_path)
    return model, fit, changes, unfreezing


def test_blocks_move_exactly_from_their_milestones(tiny_bert_dir):
    model, fit, changes, unfreezing = run(tiny_bert_dir)
    assert changes.changed == EXPECTED_CHANGED  # closed blocks bitwise still (AdamW, weight decay 0.1)
    gates = [{block: lr > 0 for block, lr in lrs.items()} for lrs in changes.lrs]
    assert [sum(g.values()) for g in gates] == [1, 2, 3, 4]
    assert changes.lrs[-1] == pytest.approx(FULL_LR)  # each block at its layer-wise LR once open
    optimizer = fit.optimizers[0]
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # every parameter in once
    steps = {g["block"]: int(optimizer.state[g["params"][0]]["step"]) for g in optimizer.param_groups}
    assert steps == {"head": 4, "bert.encoder.layer.1": 3, "bert.encoder.layer.0": 2, "embeddings": 1}
    assert unfreezing.opened == {"bert.encoder.layer.1": 1, "bert.encoder.layer.0": 2, "embeddings": 3}


def test_resume_after_a_milestone_restores_the_same_state(tiny_bert_dir, tmp_path):
    straight, *_ = run(tiny_bert_dir)
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    run(tiny_bert_dir, max_steps=2, extra=[every_step])
    checkpoint = tmp_path / "step=2.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]
    assert {"bert.encoder.layer.1": 1} in [s.get("opened") for s in saved.values()]  # layer.0 opens at step 2
    resumed, fit, changes, unfreezing = run(tiny_bert_dir, ckpt_path=checkpoint)
    assert changes.changed == EXPECTED_CHANGED[2:]  # nothing already open was frozen again
    assert unfreezing.opened == {"bert.encoder.layer.1": 1, "bert.encoder.layer.0": 2, "embeddings": 3}
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_bad_arguments_and_unsupported_modules():
    with pytest.raises(RecipeError, match="milestones or every"):
        GradualUnfreezing()
    with pytest.raises(RecipeError, match="milestones: must be increasing"):
        GradualUnfreezing(milestones=[3, 1])
    callback = GradualUnfreezing(every=2)
    assert [callback.milestones_passed(e) for e in range(5)] == [0, 0, 1, 1, 2]
    layer = torch.nn.Linear(2, 2)
    stub = type("T", (), {"optimizers": [torch.optim.SGD(layer.parameters(), lr=0.1)]})()
    with pytest.raises(RecipeError, match="GradualUnfreezing.module: cannot tell which module of Linear"):
        callback.on_fit_start(stub, layer)


@pytest.mark.slow
def test_schedule_under_ddp_on_two_cpu_processes(tiny_bert_dir, tmp_path):
    script = Path(__file__).parents[1] / "helpers" / "unfreeze_run.py"
    out = tmp_path / "ddp.json"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_bert_dir), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        state = json.loads(Path(f"{out}.{rank}").read_text())
        assert state["changed"] == EXPECTED_CHANGED  # gates held closed blocks bitwise still
        assert state["trainable"] == [
            "embeddings",
            "head",
            "layer.0",
            "layer.1",
        ]  # requires_grad never changed
        assert state["lrs"][-1] == pytest.approx(FULL_LR)
