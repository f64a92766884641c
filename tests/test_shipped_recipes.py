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


def offline_overrides(recipe: dict, tiny_bert_dir: Path, tiny_llama_dir: Path) -> list[str]:
    """CLI overrides that let a recipe build here: hub-only models become tiny local ones of the same kind,
    and timm models build with random weights (timm builds any architecture offline)."""
    backbone = recipe["model"]["init_args"]["backbone"]
    name = backbone if isinstance(backbone, str) else backbone["name"]
    if name.startswith("timm:"):
        return [f'--model.init_args.backbone={{"name": "{name}", "pretrained": false}}']
    if name.startswith("hf:"):
        causal = recipe["model"]["class_path"].endswith("SFTTask")
        return [f"--model.init_args.backbone={tiny_llama_dir if causal else tiny_bert_dir}"]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_builds_model_data_and_optimizer(path, tiny_bert_dir, tiny_llama_dir, monkeypatch):
    from finetune.cli import main

    recipe = yaml.safe_load(path.read_text())
    monkeypatch.chdir(Path(__file__).parents[1])  # recipes name their data relative to the repository
    assert main(["plan", str(path), *offline_overrides(recipe, tiny_bert_dir, tiny_llama_dir)]) == 0
