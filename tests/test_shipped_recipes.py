"""Every shipped recipe names its command first, and its optimizer, schedule and callbacks validate."""

from __future__ import annotations

import importlib

import pytest
import yaml

from finetune.optim import OptimizerConfig, ScheduleConfig
from tests.helpers.recipes import REPOSITORY, distils, offline_overrides, shipped_recipes

RECIPES = shipped_recipes()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_sections_validate(path):
    assert path.read_text().startswith(f"# python -m finetune recipes/{path.name}")
    recipe = yaml.safe_load(path.read_text())
    OptimizerConfig(**recipe.get("optimizer", {}))
    ScheduleConfig(**recipe.get("lr_scheduler", {}))
    for callback in recipe.get("trainer", {}).get("callbacks", []):
        module, _, name = callback["class_path"].rpartition(".")
        getattr(importlib.import_module(module), name)(**callback.get("init_args", {}))


# Distillation recipes need a trained teacher: tests/distill/test_distill_recipes.py builds each with one.
BUILDABLE = [path for path in RECIPES if not distils(yaml.safe_load(path.read_text()))]


@pytest.mark.slow
@pytest.mark.parametrize("path", BUILDABLE, ids=lambda p: p.name)
def test_recipe_parses_and_builds_model_data_and_optimizer(
    path, tiny_bert_dir, tiny_llama_dir, tiny_t5_dir, image_folder, monkeypatch
):
    from finetune.cli import main

    recipe = yaml.safe_load(path.read_text())
    tiny = {"bert": tiny_bert_dir, "llama": tiny_llama_dir, "t5": tiny_t5_dir, "images": image_folder}
    monkeypatch.chdir(REPOSITORY)  # recipes name their data relative to the repository
    assert main(["plan", str(path), *offline_overrides(recipe, tiny)]) == 0
