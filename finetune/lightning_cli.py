"""The Lightning CLI behind ``python -m finetune``: a recipe is a Lightning CLI config.

What it adds to ``LightningCLI``: top-level ``optimizer``/``lr_scheduler`` sections passed to the model,
the model's backbone passed to the data (for its tokenizer or image transform), a run folder per recipe
(``runs/<recipe>/version_N``), a checkpoint of the best and last epoch, and the reporting callbacks.
"""

from __future__ import annotations

import json
import re
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from finetune.callbacks import ExportModel, MetricsReport, ParameterReport, PredictionWriter, RestoreRNG
from finetune.errors import RecipeError
from finetune.optim import OptimizerConfig, ScheduleConfig


class FinetuneCLI(LightningCLI):
    """``LightningCLI`` with finetune's defaults; see the module docstring."""

    def __init__(self, *args: Any, run_name: str = "run", **kwargs: Any) -> None:
        self.run_name = run_name
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--optimizer", type=OptimizerConfig, default=OptimizerConfig(), help="Optimizer and LR groups."
        )
        parser.add_argument(
            "--lr_scheduler", type=ScheduleConfig, default=ScheduleConfig(), help="LR schedule per step."
        )
        parser.link_arguments("optimizer", "model.init_args.optimizer")
        parser.link_arguments("lr_scheduler", "model.init_args.lr_scheduler")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # Validate the typed sections now: jsonargparse would bury their RecipeError in a Union report.
        OptimizerConfig(**config.optimizer.as_dict())
        ScheduleConfig(**config.lr_scheduler.as_dict())
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
        if self.trainer.logger is not None:
            # Create the run folder through the logger first, so it does not warn that the folder is not empty.
            _ = self.trainer.logger.experiment
        labels = getattr(self.datamodule, "labels", None)
        if labels is not None and self.trainer.is_global_zero:
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "labels.json").write_text(json.dumps(list(labels), indent=2))


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"class_path '([^']+)'")
_UNKNOWN = re.compile(r"Option '([^']+)' is not accepted|No action for key \"([^\"]+)\"")


def explain_parse_error(text: str) -> RecipeError:
    """Condense a jsonargparse error (nested, one branch per Union member) into one line naming the key."""
    keys: list[str] = []
    class_path = expected = given = None
    for line in (raw.strip().lstrip("- ") for raw in text.splitlines()):
        keys += [k for k in _PARSER_KEY.findall(line) if not keys or k != keys[-1]]
        class_path = next(iter(_CLASS_PATH.findall(line)), class_path)  # the innermost class wins
        unknown = _UNKNOWN.search(line)
        if unknown:
            name = unknown.group(1) or unknown.group(2)
            key = ".".join([*keys, name]).replace("init_args.", "")
            return RecipeError(key, f"unknown key{_valid_keys(class_path)}; check its spelling and section")
        if line.startswith("unrecognized arguments:"):
            return RecipeError(
                line.split()[2].lstrip("-"), "unknown key; `--help` after the command lists the keys"
            )
        if line.startswith("Expected a") and "NoneType" not in line and expected is None:
            expected = line.removeprefix("Expected a ").replace("<class '", "").replace("'>", "")
        elif line.startswith("Given value:") and expected is not None and given is None:
            given = line.split(":", 1)[1].split(". Got value")[0].strip()
    key = ".".join(keys).replace("init_args.", "") or "recipe"
    if expected:
        return RecipeError(key, f"expected {expected}, got {given!r}; fix the value's type")
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return RecipeError(key, first)


def _valid_keys(class_path: str | None) -> str:
    if not class_path:
        return ""
    from jsonargparse._parameter_resolvers import get_signature_parameters
    from jsonargparse._util import import_object

    try:
        names = [p.name for p in get_signature_parameters(import_object(class_path), None)]
    except (ImportError, AttributeError, ValueError):
        return ""
    return f" for {class_path} (valid: {', '.join(names)})"


def run_cli(argv: list[str], run: bool = True) -> FinetuneCLI:
    """Run the Lightning CLI on ``argv`` (with ``run=False``: only build trainer, model and data, from
    ``argv`` without a subcommand); turn argument and recipe errors into ``RecipeError``."""
    from finetune.data import ImageClassificationData, TextClassificationData  # noqa: F401
    from finetune.tasks import ClassificationTask  # noqa: F401  (registers subclasses for short class names)

    config = next((value for flag, value in zip(argv, argv[1:]) if flag in ("--config", "-c")), None)
    run_name = Path(config).stem if config else "run"
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
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
            run=run,
            args=argv,
        )
    except ArgumentError as error:  # jsonargparse's report of a bad key or value
        raise explain_parse_error(str(error)) from error
