"""Fitting a tiny recipe through the CLI with ``RunReport``, for the report and card tests."""

from __future__ import annotations

from pathlib import Path

from finetune.cli import main
from tests.helpers.recipes import write

RUN_REPORT = {"class_path": "finetune.callbacks.RunReport"}


def fit(recipe: dict, root: Path, name: str = "recipe") -> Path:
    """Fit ``recipe`` with ``RunReport`` through the CLI (the recipe written under ``root``); its run folder."""
    recipe["trainer"]["callbacks"] = [RUN_REPORT]
    assert main([str(write(recipe, root / f"{name}.yaml"))]) == 0
    return Path(recipe["trainer"]["default_root_dir"]) / name / "version_0"
