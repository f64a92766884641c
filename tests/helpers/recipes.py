"""Tiny recipes for CLI tests, written next to the test's data; the shipped recipes and how they build here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def text_recipe(bert_dir: Path, csv: Path, root: Path, **data: Any) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 5,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "class_path": "finetune.ClassificationTask",
            "init_args": {"backbone": str(bert_dir), "strategy": "full"},
        },
        "optimizer": {"name": "adamw", "lr": 0.003},
        "data": {
            "class_path": "finetune.data.TextClassificationData",
            "init_args": {
                "train": str(csv),
                "val_fraction": 0.25,
                "test_fraction": 0.25,
                "batch_size": 4,
                **data,
            },
        },
    }


def image_recipe(checkpoint: Path, folder: Path, root: Path) -> dict[str, Any]:
    recipe = text_recipe(checkpoint, folder, root)
    recipe["trainer"]["max_epochs"] = 1
    recipe["model"]["init_args"] = {
        "backbone": {"name": "timm:test_vit", "checkpoint": str(checkpoint)},
        "strategy": "freeze",
    }
    recipe["data"] = {
        "class_path": "finetune.data.ImageClassificationData",
        "init_args": {"train": str(folder), "val_fraction": 0.25, "test_fraction": 0.25, "batch_size": 4},
    }
    return recipe


def tagging_recipe(bert_dir: Path, train: Path, val: Path, root: Path) -> dict[str, Any]:
    """A token tagging recipe: TokenClassificationTask on ``bert_dir`` over CoNLL ``train``/``val`` files."""
    recipe = text_recipe(bert_dir, train, root)
    recipe["trainer"]["max_epochs"] = 4
    recipe["model"] = {
        "class_path": "finetune.tasks.token_classification.TokenClassificationTask",
        "init_args": {"backbone": str(bert_dir), "strategy": "full"},
    }
    recipe["optimizer"] = {"name": "adamw", "lr": 0.005}
    recipe["data"] = {
        "class_path": "finetune.data.tagging.TokenTaggingData",
        "init_args": {"train": str(train), "val": str(val), "batch_size": 16},
    }
    return recipe


def write(recipe: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


REPOSITORY = Path(__file__).resolve().parents[2]


def shipped_recipes() -> list[Path]:
    """Every recipe under ``recipes/``: each is parsed and built by a test (distillation ones with a teacher)."""
    return sorted((REPOSITORY / "recipes").glob("*.yaml"))


def offline_overrides(recipe: dict, tiny: dict[str, Path]) -> list[str]:
    """CLI overrides that let a recipe build here: hub-only models become tiny local ones of the same kind,
    timm models build with random weights (timm builds any architecture offline; a recipe's weights file
    is not read), a placeholder image folder becomes a tiny one, and batches hold 2 rows (the plan probes
    one batch: a ViT-L on 32 images would take a minute on 2 cores and prove nothing more)."""
    overrides = []
    backbone = recipe["model"]["init_args"]["backbone"]
    name = backbone if isinstance(backbone, str) else backbone["name"]
    if name.startswith("timm:"):
        # A recipe's local weights file (checkpoint) may not be there yet: random weights need none.
        overrides.append(
            f'--model.init_args.backbone={{"name": "{name}", "pretrained": false, "checkpoint": null}}'
        )
    elif name.startswith("hf:"):
        task = recipe["model"]["class_path"].rpartition(".")[2]
        kind = {"SFTTask": "llama", "PreferenceTask": "llama", "Seq2SeqTask": "t5"}.get(task, "bert")
        overrides.append(f"--model.init_args.backbone={tiny[kind]}")
    data = recipe["data"]
    if (
        data["class_path"].endswith("ImageClassificationData")
        and not Path(data["init_args"]["train"]).exists()
    ):
        overrides.append(f"--data.init_args.train={tiny['images']}")
    return [*overrides, "--data.init_args.batch_size=2"]


def distils(recipe: dict) -> bool:
    return any(
        c["class_path"].endswith("Distillation") for c in recipe.get("trainer", {}).get("callbacks", [])
    )
