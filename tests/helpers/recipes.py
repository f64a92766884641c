"""Tiny recipes for CLI tests, written next to the test's data."""

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


def write(recipe: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
