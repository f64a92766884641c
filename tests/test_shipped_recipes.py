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


def offline_overrides(recipe: dict, tiny: dict[str, Path]) -> list[str]:
    """CLI overrides that let a recipe build here: hub-only models become tiny local ones of the same kind,
    timm models build with random weights (timm builds any architecture offline), and a placeholder image
    folder becomes a tiny one."""
    overrides = []
    backbone = recipe["model"]["init_args"]["backbone"]
    name = backbone if isinstance(backbone, str) else backbone["name"]
    if name.startswith("timm:"):
        overrides.append(f'--model.init_args.backbone={{"name": "{name}", "pretrained": false}}')
    elif name.startswith("hf:"):
        causal = recipe["model"]["class_path"].endswith("SFTTask")
        overrides.append(f"--model.init_args.backbone={tiny['llama' if causal else 'bert']}")
    data = recipe["data"]
    if (
        data["class_path"].endswith("ImageClassificationData")
        and not Path(data["init_args"]["train"]).exists()
    ):
        overrides.append(f"--data.init_args.train={tiny['images']}")
    return overrides


def distils(recipe: dict) -> bool:
    return any(
        c["class_path"].endswith("Distillation") for c in recipe.get("trainer", {}).get("callbacks", [])
    )


# Distillation recipes need a trained teacher: tests/distill/test_distill_recipes.py runs each end to end.
BUILDABLE = [path for path in RECIPES if not distils(yaml.safe_load(path.read_text()))]


@pytest.mark.slow
@pytest.mark.parametrize("path", BUILDABLE, ids=lambda p: p.name)
def test_recipe_parses_and_builds_model_data_and_optimizer(
    path, tiny_bert_dir, tiny_llama_dir, image_folder, monkeypatch
):
    from finetune.cli import main

    recipe = yaml.safe_load(path.read_text())
    tiny = {"bert": tiny_bert_dir, "llama": tiny_llama_dir, "images": image_folder}
    monkeypatch.chdir(Path(__file__).parents[1])  # recipes name their data relative to the repository
    assert main(["plan", str(path), *offline_overrides(recipe, tiny)]) == 0


def test_every_distillation_recipe_has_an_end_to_end_test():
    tested = (Path(__file__).parent / "distill" / "test_distill_recipes.py").read_text()
    for path in set(RECIPES) - set(BUILDABLE):
        assert path.name in tested, path.name
