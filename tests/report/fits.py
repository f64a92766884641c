"""Fitting a tiny recipe through the CLI with ``RunReport``, for the report and card tests."""

from __future__ import annotations

from pathlib import Path

from finetune.cli import main
from tests.helpers.recipes import write


def fit(recipe: dict, root: Path, name: str = "recipe") -> Path:
    """Fit ``recipe`` through the CLI (``RunReport`` is a default callback; the recipe written under ``root``);
    its run folder."""
    assert main([str(write(recipe, root / f"{name}.yaml"))]) == 0
    return Path(recipe["trainer"]["default_root_dir"]) / name / "version_0"
