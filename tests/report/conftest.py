"""One tiny text classification fit through the CLI with ``RunReport``, read by the plot and card tests."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch  # noqa: F401  (binds Lightning's log handler to the real stderr, before capsys swaps it)
import pytest

from tests.helpers.recipes import text_recipe
from tests.report.fits import fit


@pytest.fixture(scope="session")
def report_run(tiny_bert_dir, text_csv, tmp_path_factory) -> Path:
    """Two epochs of the tiny BERT on the keyword task (then its test): 10 optimizer steps an epoch."""
    root = tmp_path_factory.mktemp("report-run")
    recipe = text_recipe(tiny_bert_dir, text_csv, root / "runs")
    recipe["trainer"]["max_epochs"] = 2
    return fit(recipe, root)
