"""Shared by the multi-label and regression task tests: tiny data with several labels or float targets per
text, one optimizer step under each strategy on a task's own loss, and a run folder to distil from."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import torch
import yaml

from finetune import runs
from finetune.strategies import adapter_parameter_names
from finetune.strategies.adapters import is_quantised

WORDS = ["good", "bad", "movie", "food", "day", "very"]
CPU_QLORA = {"name": "qlora", "compute_dtype": "float32"}
# Each strategy on the tiny BERT (2 blocks, head `classifier`): what trains besides adapters.
STRATEGIES = {
    "full": ("full", ("model.",)),
    "freeze": ("freeze", ("model.classifier.",)),
    "partial": (
        {"name": "partial", "last_blocks": 1},
        ("model.bert.encoder.layer.1.", "model.bert.pooler.", "model.classifier."),
    ),
    "lora": ("lora", ("model.classifier.",)),
    "qlora": (CPU_QLORA, ("model.classifier.",)),
}


def write_reviews(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """``rows`` texts of 6 words; ``tags`` names which of good/bad they hold (``pos|neg``), ``pos``/``neg``
    are the same as 0/1 columns, and ``score`` is ``2·#good - #bad + 10``."""
    rng = random.Random(seed)
    records = []
    for _ in range(rows):
        words = [rng.choice(WORDS) for _ in range(6)]
        pos, neg = "good" in words, "bad" in words
        records.append(
            {
                "text": " ".join(words),
                "tags": "|".join(tag for tag, on in (("pos", pos), ("neg", neg)) if on),
                "pos": int(pos),
                "neg": int(neg),
                "score": 2.0 * words.count("good") - words.count("bad") + 10,
            }
        )
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def text_batch(tiny_bert_dir: Path, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Three tokenised texts with the given ``labels`` (float rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = dict(tokenizer(["good movie", "bad day very", "okay food"], padding=True, return_tensors="pt"))
    return batch | {"labels": labels, "index": torch.arange(3)}


def assert_one_step_trains_exactly(task, batch, strategy: str) -> None:
    """One SGD step on the task's own loss: exactly the strategy's parameters are trainable; every frozen one
    is bitwise unchanged, every trained one changed (LoRA's A gets no gradient while B is zero)."""
    task.configure_model()
    task.train()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    task.task_loss(task(batch), batch, "train").backward()
    optimizer.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    adapters = set(adapter_parameter_names(task)) if strategy in ("lora", "qlora") else set()
    assert bool(adapters) == (strategy in ("lora", "qlora"))
    assert is_quantised(task.model) == (strategy == "qlora")
    expected = adapters | {n for n in before if n.startswith(STRATEGIES[strategy][1])}
    assert trainable == expected
    assert not changed - expected, f"frozen parameters changed: {changed - expected}"
    assert {n for n in expected if "lora_A" not in n} <= changed, f"unchanged: {expected - changed}"


def trainer(root: Path, **settings) -> pl.Trainer:
    """A quiet CPU trainer writing under ``root``."""
    options = {
        "accelerator": "cpu",
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": pl.loggers.CSVLogger(root),
        "log_every_n_steps": 1,
    }
    return pl.Trainer(**(options | settings))


def run_folder(task, data, root: Path, class_path: str) -> Path:
    """Train ``task`` for one epoch and lay it out as a finished run (``config.yaml`` naming its class, a
    best checkpoint): what ``Distillation(teacher=...)`` and ``finetune.runs.load_run`` read."""
    fitted = trainer(root, max_epochs=1, enable_checkpointing=False)
    fitted.fit(task, data)
    run = root / "run"
    (run / runs.CHECKPOINTS).mkdir(parents=True)
    (run / runs.CONFIG).write_text(yaml.safe_dump({"model": {"class_path": class_path}}))
    fitted.save_checkpoint(run / runs.CHECKPOINTS / "best-epoch0-step1.ckpt")
    return run
