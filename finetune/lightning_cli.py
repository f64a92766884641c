"""The Lightning CLI behind ``python -m finetune``: a recipe is a Lightning CLI config.

What it adds to ``LightningCLI``: top-level ``optimizer``/``lr_scheduler`` sections passed to the model,
the model's backbone passed to the data (for its tokenizer or image transform), a run folder per recipe
(``runs/<recipe>/version_N``), a checkpoint of the best and last epoch, and the reporting callbacks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerCallable,
    OptimizerCallable,
)

from finetune.callbacks import ExportModel, MetricsReport, ParameterReport, PredictionWriter, RestoreRNG
from finetune.errors import RecipeError


class FinetuneCLI(LightningCLI):
    """``LightningCLI`` with finetune's defaults; see the module docstring."""

    def __init__(self, *args: Any, run_name: str = "run", **kwargs: Any) -> None:
        self.run_name = run_name
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--optimizer",
            type=OptimizerCallable | None,
            default=None,
            help="Optimizer (default AdamW, lr 1e-4).",
        )
        parser.add_argument(
            "--lr_scheduler", type=LRSchedulerCallable | None, default=None, help="LR scheduler."
        )
        parser.link_arguments("optimizer", "model.init_args.optimizer")
        parser.link_arguments("lr_scheduler", "model.init_args.lr_scheduler")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.CSVLogger",
                init_args=Namespace(save_dir=trainer.default_root_dir or "runs", name=self.run_name),
            )
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_checkpointing is not False and not any(
            c.class_path.endswith("ModelCheckpoint") for c in callbacks
        ):
            callbacks.append(self._checkpoint(config.model.class_path))
        trainer.callbacks = callbacks

    @staticmethod
    def _checkpoint(model_class_path: str) -> Namespace:
        """Keep the best epoch by the task's own metric, and the last one for resuming."""
        from jsonargparse._util import import_object

        task = import_object(model_class_path)
        return Namespace(
            class_path="lightning.pytorch.callbacks.ModelCheckpoint",
            init_args=Namespace(
                monitor=getattr(task, "monitor", None),
                mode=getattr(task, "monitor_mode", "min"),
                save_last=True,
                filename="best-epoch{epoch}-step{step}",
                auto_insert_metric_name=False,
            ),
        )

    def before_fit(self) -> None:
        labels = getattr(self.datamodule, "labels", None)
        if labels is not None and self.trainer.is_global_zero:
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "labels.json").write_text(json.dumps(list(labels), indent=2))


_KEY = re.compile(r'key "([^"]+)"|Parser key "([^"]+)"')


def _parse_error_message(text: str) -> str:
    """The first meaningful line of a jsonargparse error, with ``init_args.`` dropped from keys."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("usage:")]
    message = next((line for line in lines if "error:" in line), lines[0] if lines else text)
    message = message.split("error:", 1)[-1].strip()
    return message.replace("init_args.", "")


def run_cli(argv: list[str]) -> FinetuneCLI:
    """Run the Lightning CLI on ``argv``; turn argument and recipe errors into ``RecipeError``."""
    from finetune.data import ImageClassificationData, TextClassificationData  # noqa: F401
    from finetune.tasks import ClassificationTask  # noqa: F401  (registers subclasses for short class names)

    config = next((value for flag, value in zip(argv, argv[1:]) if flag in ("--config", "-c")), None)
    run_name = Path(config).stem if config else "run"
    try:
        return FinetuneCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            seed_everything_default=42,
            trainer_defaults={
                "callbacks": [
                    ParameterReport(),
                    MetricsReport(),
                    ExportModel(),
                    PredictionWriter(),
                    RestoreRNG(),
                ],
                "enable_model_summary": False,
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            run_name=run_name,
            args=argv,
        )
    except RecipeError:
        raise
    except Exception as error:  # jsonargparse reports bad keys and values as ArgumentError / ValueError
        if (
            type(error).__module__.startswith(("jsonargparse", "argparse"))
            or "ArgumentError" in type(error).__name__
        ):
            raise RecipeError("recipe", _parse_error_message(str(error))) from error
        raise
