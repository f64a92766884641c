"""What finetune adds per step: a plain PyTorch loop vs ``ClassificationTask`` in a Lightning ``Trainer``.

Same model (random 2-layer BERT), same 64 batches of 16 x 64 tokens, same AdamW, one process, alternating
runs, median of 3. Run: ``python -m bench.overhead``. Prints a markdown table.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizerFast  # noqa: E402

from finetune import ClassificationTask, OptimizerConfig  # noqa: E402
from finetune.callbacks import ParameterReport, RestoreRNG  # noqa: E402

STEPS, BATCH, LENGTH, LR = 64, 16, 64, 1e-4


def save_model(directory: Path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(995)]]
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(directory)
    config = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    BertModel(config).save_pretrained(directory)


def batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(5, 1000, (BATCH, LENGTH), generator=generator),
            "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=generator),
        }
        for _ in range(STEPS)
    ]


def plain_loop(directory: Path, data: list[dict[str, torch.Tensor]]) -> float:
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    start = time.perf_counter()
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


class Timer(pl.Callback):
    """Times the training loop only (model loading is the same in both and not counted)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def finetune_trainer(directory: Path, data: list[dict[str, torch.Tensor]]) -> float:
    """``directory`` holds the model and receives the run plan that ``ParameterReport`` writes."""
    task = ClassificationTask(str(directory), labels=["a", "b"], optimizer=OptimizerConfig(lr=LR))
    timer = Timer()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        callbacks=[ParameterReport(), RestoreRNG(), timer],
    )
    with_index = [b | {"index": torch.arange(BATCH)} for b in data]
    trainer.fit(task, DataLoader(with_index, batch_size=None))
    return timer.seconds


def main() -> None:
    torch.manual_seed(0)
    data = batches()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        save_model(directory)
        times: dict[str, list[float]] = {"plain PyTorch loop": [], "finetune (Lightning + callbacks)": []}
        for _ in range(3):
            times["plain PyTorch loop"].append(plain_loop(directory, data))
            times["finetune (Lightning + callbacks)"].append(finetune_trainer(directory, data))
    base = statistics.median(times["plain PyTorch loop"])
    print(f"{STEPS} steps, batch {BATCH} x {LENGTH} tokens, 2-layer BERT (128 wide), AdamW; median of 3\n")
    print("| loop | seconds | ratio |\n|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {statistics.median(seconds):.2f} | {statistics.median(seconds) / base:.2f} |")


if __name__ == "__main__":
    main()
