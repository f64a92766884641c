"""``python -m finetune plan RECIPE.yaml``: build model, data and optimizer from a recipe, print the run
plan (``finetune.plan``), train nothing and write nothing."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.cli.recipe_file import read_recipe
from finetune.errors import RecipeError

log = logging.getLogger(__name__)

USAGE = "python -m finetune plan RECIPE.yaml [--section.key=value ...]"


def main(argv: list[str]) -> int:
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise RecipeError("plan", f"give a recipe: {USAGE}")
    read_recipe(Path(argv[0]))
    import lightning.pytorch as pl
    from lightning.pytorch.cli import SaveConfigCallback

    from finetune.callbacks import ExportModel, MetricsReport, ParameterReport, PredictionWriter, RunReport
    from finetune.cli.lightning import run_cli
    from finetune.plan import run_plan

    class PlanReady(Exception):
        """Stops ``fit`` right after setup: the plan is known."""

    # Built on one device with nothing written; memory per device follows the recipe's devices and strategy.
    cli = run_cli(["--config", argv[0], *argv[1:]], run=False, plan=True)

    class PlanProbe(pl.Callback):
        def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.text = run_plan(trainer, pl_module, cli.placement)
            raise PlanReady

    probe = PlanProbe()
    writers = (ExportModel, MetricsReport, ParameterReport, PredictionWriter, RunReport, SaveConfigCallback)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, writers)] + [probe]
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except PlanReady:
        pass
    log.info("Run plan for %s (per device)\n\n%s", argv[0], probe.text)
    return 0
