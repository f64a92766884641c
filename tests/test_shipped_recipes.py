"""Every shipped recipe names its command first, and its optimizer, schedule and callbacks validate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from finetune.optim import OptimizerConfig, ScheduleConfig

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_sections_validate(path):
    assert path.read_text().startswith(f"# python -m finetune recipes/{path.name}")
    recipe = yaml.safe_load(path.read_text())
    OptimizerConfig(**recipe.get("optimizer", {}))
    ScheduleConfig(**recipe.get("lr_scheduler", {}))
    for callback in recipe.get("trainer", {}).get("callbacks", []):
        module, _, name = callback["class_path"].rpartition(".")
        getattr(importlib.import_module(module), name)(**callback.get("init_args", {}))
