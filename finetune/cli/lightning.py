"""The Lightning CLI behind ``python -m finetune``: a recipe is a Lightning CLI config.

What it adds to ``LightningCLI``: top-level ``optimizer``/``lr_scheduler`` sections passed to the model,
the model's backbone passed to the data (for its tokenizer or image transform), a run folder per recipe
(``runs/<recipe>/version_N``) with the recipe's trackers (``trainer.logger``) placed beside it, a checkpoint
of the best and last epoch, early stopping in the direction of its metric, and the reporting callbacks.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from finetune import runs
from finetune.callbacks import (
    AtomicCheckpointIO,
    ExportModel,
    MetricsReport,
    ParameterReport,
    PredictionWriter,
    Preemption,
    RestoreRNG,
    RunReport,
    StopOnNonFinite,
)
from finetune.callbacks.trackers import LoggerSpec, TrackRun, run_loggers
from finetune.checkpoints import check_loadable, newest_loadable
from finetune.cli.trainer_checks import check_trainer
from finetune.errors import RecipeError
from finetune.optim import OptimizerConfig, ScheduleConfig
from finetune.parallel import placement
from finetune.parallel.checks import check_combination
from finetune.parallel.placement import Placement
from finetune.strategies import Strategy


class FinetuneCLI(LightningCLI):
    """``LightningCLI`` with finetune's defaults; see the module docstring."""

    def __init__(
        self, *args: Any, config_path: Path | None = None, plan: bool = False, **kwargs: Any
    ) -> None:
        self.config_path = config_path
        self.run_name = runs.recipe_name(config_path) if config_path is not None else "run"
        self.plan = plan
        self.placement: Placement | None = None  # where the recipe asks the run to go (devices, sharding)
        self.trackers: Any = None  # the recipe's trainer.logger, as parsed: None/True (CSV), False, specs
        super().__init__(*args, **kwargs)

    def _section(self, config: Namespace) -> Namespace:
        """The part of a parsed (or instantiated) config that holds this subcommand's sections."""
        return config[self.subcommand] if self.subcommand else config

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for section, config in SECTIONS.items():
            parser.add_argument(
                f"--{section}", type=config, default=config(), help=config.__doc__.splitlines()[0]
            )
        parser.link_arguments("optimizer", "model.init_args.optimizer")
        parser.link_arguments("lr_scheduler", "model.init_args.lr_scheduler")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")

    @override
    def _parse_ckpt_path(self) -> None:
        """The recipe alone decides the model: ``--ckpt_path`` supplies weights and training state only.

        (LightningCLI would merge the checkpoint's hyperparameters into the recipe; ours are plain data
        for ``load_from_checkpoint``, not recipe keys.)
        """

    @override
    def before_instantiate_classes(self) -> None:
        config = self._section(self.config)
        # Validate the typed sections now: jsonargparse would bury their RecipeError in a Union report.
        OptimizerConfig(**config.optimizer.as_dict())
        ScheduleConfig(**config.lr_scheduler.as_dict())
        trainer = config.trainer
        check_trainer(trainer)
        self.placement = placement.from_recipe(trainer.strategy, trainer.devices, trainer.num_nodes)
        callbacks = [
            str(c.class_path).rpartition(".")[2] for c in trainer.callbacks or [] if "class_path" in c
        ]
        check_combination(self.placement, callbacks, _strategy_name(config.model.init_args.strategy))
        if self.plan:
            # One device, nothing written: the plan is computed per device from self.placement.
            for key, value in PLAN_TRAINER.items():
                trainer[key] = value
        if self.subcommand is not None and config.ckpt_path is not None:
            config.ckpt_path = str(self._checkpoint(config.ckpt_path, trainer))
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_checkpointing is not False and not any(
            c.class_path.endswith("ModelCheckpoint") for c in callbacks
        ):
            callbacks = self._checkpoints(config.model.class_path) + callbacks
        _early_stopping(callbacks, config.model.class_path)
        trainer.callbacks = callbacks

    def _checkpoint(self, ckpt_path: str, trainer: Namespace) -> Path:
        """``--ckpt_path``: ``last`` becomes the newest whole checkpoint of this recipe's runs (under
        ``<default_root_dir>/<recipe>/version_*``); any other path must be a whole checkpoint."""
        if ckpt_path != "last":
            check_loadable(Path(ckpt_path))
            return Path(ckpt_path)
        root = Path(trainer.default_root_dir or "runs") / self.run_name
        found = newest_loadable(root.glob(f"version_*/{runs.CHECKPOINTS}/*.ckpt"))
        if found is None:
            raise RecipeError(
                "ckpt_path", f"no whole checkpoint to resume from under {root}; train first, or give a path"
            )
        return found

    @override
    def instantiate_classes(self) -> None:
        # The loggers are made by instantiate_trainer, in the run folder only it knows (jsonargparse would make
        # the recipe's where their own arguments say, and cannot make a TensorBoardLogger without save_dir).
        # The config keeps trainer.logger as the recipe gives it: config.yaml is written later, at setup.
        trainer = self._section(self.config).trainer
        self.trackers, trainer.logger = trainer.logger, None
        try:
            super().instantiate_classes()
        finally:
            trainer.logger = self.trackers

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        # The loggers are made here, not written into the recipe: a saved config.yaml then follows the
        # default_root_dir it is run with, instead of pinning the folder of the run that saved it.
        config = self._section(self.config_init).trainer
        if self.trackers is False:
            kwargs["logger"] = False
        else:
            root = Path(config.default_root_dir or "runs")
            kwargs["logger"] = run_loggers(_logger_specs(self.trackers), root, self.run_name)
        if not config.plugins:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _checkpoints(model_class_path: str) -> list[Namespace]:
        """``best-*.ckpt`` by the task's own metric, and ``last.ckpt`` rewritten every epoch for resuming.

        Two callbacks, because Lightning (2.6) writes ``save_last`` only in epochs that also save a best one.
        The best one comes first: ``trainer.checkpoint_callback`` (used for export) is the first.
        """
        from finetune.tasks import FinetuneTask

        task = runs.import_class(model_class_path, "model.class_path")
        ours = issubclass(task, FinetuneTask)
        checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
        best = Namespace(
            monitor=task.monitor.metric if ours else None,
            mode=task.monitor.mode if ours else "min",
            filename=runs.BEST,
            auto_insert_metric_name=False,
        )
        last = Namespace(monitor=None, filename=runs.LAST, enable_version_counter=False)
        return [
            Namespace(class_path=checkpoint, init_args=best),
            Namespace(class_path=checkpoint, init_args=last),
        ]

    @override
    def before_fit(self) -> None:
        if self.trainer.logger is not None:
            # Create the run folder through the logger first, so it does not warn that the folder is not empty.
            _ = self.trainer.logger.experiment
        save_labels = getattr(self.datamodule, "save_labels", None)
        if self.trainer.is_global_zero and callable(save_labels):
            save_labels(runs.run_dir(self.trainer))

    @override
    def after_fit(self) -> None:
        """End ``fit`` with a test of the (best) model when the data has a test split (finetune's data
        modules say so through ``table("test")``)."""
        data = self.datamodule
        table = getattr(data, "table", None)
        if callable(table) and table("test") is not None and not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=data)


def _logger_specs(value: Any) -> list[LoggerSpec]:
    """The recipe's ``trainer.logger`` (None or True: the CSV logger alone; one or a list of ``class_path``
    specs) as logger classes and their init args."""
    if value is None or value is True:
        return []
    specs = value if isinstance(value, list) else [value]
    return [
        (
            runs.import_class(spec.class_path, "trainer.logger"),
            spec.init_args.as_dict() if spec.get("init_args") else {},
        )
        for spec in specs
    ]


# The last part of a metric's name for which lower is better; higher is, for every other metric tasks log.
LOWER_IS_BETTER = ("loss", "mae", "rmse", "perplexity")


def metric_mode(task: type, metric: str) -> Literal["min", "max"]:
    """Which way ``metric`` of ``task`` (a ``FinetuneTask`` class) improves: its ``monitor``'s mode for the
    metric its checkpoints follow, else by the metric's name (``LOWER_IS_BETTER``)."""
    if metric == task.monitor.metric:
        return task.monitor.mode
    return "min" if metric.rpartition("/")[2] in LOWER_IS_BETTER else "max"


def _early_stopping(callbacks: list[Namespace], model_class_path: str) -> None:
    """A recipe's ``EarlyStopping`` on a finetune task watches a metric the task logs each validation epoch, in
    the direction the metric improves (``mode`` is set)."""
    from finetune.tasks import FinetuneTask

    task = runs.import_class(model_class_path, "model.class_path")
    if not issubclass(task, FinetuneTask):
        return
    for callback in callbacks:
        if "class_path" not in callback or not issubclass(
            runs.import_class(callback.class_path, "trainer.callbacks"), EarlyStopping
        ):
            continue
        args = callback.init_args
        if args.monitor not in task.epoch_metrics:
            raise RecipeError(
                "trainer.callbacks.EarlyStopping.monitor",
                f"{task.__name__} logs no {args.monitor!r} each epoch; choose one of: {', '.join(task.epoch_metrics)}",
            )
        args.mode = metric_mode(task, args.monitor)


PLAN_TRAINER = {
    "devices": 1,
    "num_nodes": 1,
    "strategy": "auto",
    "logger": False,
    "enable_checkpointing": False,
    "num_sanity_val_steps": 0,
}


def _strategy_name(value: Any) -> str:
    """The registered name of a recipe's ``model.strategy`` (a name, a ``{name: ...}`` or a class_path)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("name", ""))
    return str(getattr(value, "class_path", "")).rpartition(".")[2].lower()


# Top-level recipe sections of our own, typed by a finetune config class (not a torch class_path).
SECTIONS = {"optimizer": OptimizerConfig, "lr_scheduler": ScheduleConfig}
_DISABLED_SUBCLASS = re.compile(r"Subclasses are disabled for (\w+), thus '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PATH = re.compile(r"class_path '([^']+)'")
_UNKNOWN = re.compile(r"Option '([^']+)' is not accepted|No action for key \"([^\"]+)\"")
# A RecipeError raised while jsonargparse validated a value (a strategy's __post_init__) is buried in its report.
_OUR_ERROR = re.compile(
    r"^[\s-]*((?:model|data|trainer|optimizer|lr_scheduler)(?:\.[\w\[\]-]+)+): (.+)$", re.M
)
_BAD_CLASS_PATH = re.compile(
    r"Problem with given class_path '([^']+)':\s*\n\s*(?:module '[^']*' has no attribute|No module named)"
)
_REQUIRED = re.compile(r"class_path '([^']+)':\s*\n\s*the following arguments are required: (\w+)")
_NOT_A_CLASS = re.compile(r"Expected a dot import path string: (\S+)")
# Lightning's loggers, by the short names a recipe's trainer.logger takes.
LOGGERS = "TensorBoardLogger, MLFlowLogger, WandbLogger, CSVLogger"


def explain_parse_error(text: str) -> RecipeError:
    """Condense a jsonargparse error (nested, one branch per Union member) into one line naming the key."""
    ours = _OUR_ERROR.search(text)
    if ours:
        return RecipeError(ours.group(1), ours.group(2).strip())
    trainer_class = _trainer_class_error(text)
    if trainer_class:
        return trainer_class
    bad_class = _BAD_CLASS_PATH.search(text)
    if bad_class:
        parser_keys = dict.fromkeys(_PARSER_KEY.findall(text[: bad_class.start()]))
        section = ".".join(parser_keys).replace("init_args.", "") or "recipe"
        return unknown_class(f"{section}.class_path", bad_class.group(1))
    keys: list[str] = []
    class_path = expected = given = None
    for line in (raw.strip().lstrip("- ") for raw in text.splitlines()):
        disabled = _DISABLED_SUBCLASS.search(line)
        section = next((k for k, c in SECTIONS.items() if disabled and c.__name__ == disabled.group(1)), None)
        if section:
            return RecipeError(
                section,
                f"give its keys directly (e.g. {section}: {{name: ...}}), not class_path {disabled.group(2)!r}",
            )
        keys += [k for k in _PARSER_KEY.findall(line) if not keys or k != keys[-1]]
        class_path = next(iter(_CLASS_PATH.findall(line)), class_path)  # the innermost class wins
        unknown = _UNKNOWN.search(line)
        if unknown:
            name = unknown.group(1) or unknown.group(2)
            key = ".".join([*keys, name]).replace("init_args.", "")
            return RecipeError(key, f"unknown key{_valid_keys(class_path)}; check its spelling and section")
        if line.startswith("unrecognized arguments:"):
            key = line.split()[2].lstrip("-").split("=")[0]
            return RecipeError(key, "unknown key; `--help` after the command lists the keys")
        if line.startswith("Expected a") and "NoneType" not in line and expected is None:
            expected = line.removeprefix("Expected a ").replace("<class '", "").replace("'>", "")
        elif line.startswith("Given value:") and expected is not None and given is None:
            given = line.split(":", 1)[1].split(". Got value")[0].strip()
    key = ".".join(keys).replace("init_args.", "") or "recipe"
    if expected:
        return RecipeError(key, f"expected {expected}, got {given!r}; fix the value's type")
    first = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return RecipeError(key, first)


def _trainer_class_error(text: str) -> RecipeError | None:
    """A logger or callback (``trainer.logger``, ``trainer.callbacks``) missing an argument its class requires,
    or a logger name that imports nothing."""
    section = next(iter(_PARSER_KEY.findall(text)), "")
    if section not in ("trainer.logger", "trainer.callbacks"):
        return None
    required = _REQUIRED.search(text)
    if required:
        name = required.group(1).rpartition(".")[2]
        example = " (the runs root, e.g. runs: it writes into <root>/<recipe>/version_N/tensorboard)"
        return RecipeError(
            f"{section}.{name}.{required.group(2)}",
            f"{name} requires it{example if name == 'TensorBoardLogger' else ''}; give it in init_args",
        )
    not_a_class = _NOT_A_CLASS.search(text)
    if not_a_class and section == "trainer.logger":
        return RecipeError(
            section,
            f"{not_a_class.group(1)!r} is not a logger; name one of {LOGGERS} (a list for several), "
            "or give class_path and init_args",
        )
    return None


def unknown_class(key: str, class_path: str) -> RecipeError:
    """A class_path that imports nothing, with the closest classes finetune and Lightning offer."""
    import lightning.pytorch.callbacks as lightning_callbacks

    import finetune
    from finetune import callbacks, data, strategies, tasks

    known = [
        *(f"finetune.{name}" for name in finetune.__all__),
        *(
            f"finetune.{module.__name__.rpartition('.')[2]}.{name}"
            for module in (callbacks, data, strategies, tasks)
            for name in module.__all__
        ),
        *(f"lightning.pytorch.callbacks.{name}" for name in lightning_callbacks.__all__),
    ]
    close = difflib.get_close_matches(class_path, known, n=3, cutoff=0.75)
    hint = f"did you mean {', '.join(close)}?" if close else "give module.ClassName of an importable class"
    return RecipeError(key, f"{class_path!r} is not a class here; {hint}")


def _valid_keys(class_path: str | None) -> str:
    if not class_path:
        return ""
    try:
        names = init_parameters(runs.import_class(class_path, "class_path"))
    except RecipeError:
        return ""
    return f" for {class_path} (valid: {', '.join(names)})"


def init_parameters(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up to the base classes (the
    pattern our data modules and tasks use for the arguments their bases declare)."""
    names: dict[str, None] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names.update(dict.fromkeys(p.name for p in parameters if p.kind in kinds))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return list(names)


def run_cli(argv: list[str], run: bool = True, plan: bool = False) -> FinetuneCLI:
    """Run the Lightning CLI on ``argv`` (with ``run=False``: only build trainer, model and data, from
    ``argv`` without a subcommand; with ``plan``: on one device, writing nothing); turn argument and recipe
    errors into ``RecipeError``."""
    from finetune.data import (  # noqa: F401  (registers subclasses for short class names)
        ImageClassificationData,
        InstructionData,
        PreferenceData,
        Seq2SeqData,
        TextClassificationData,
        TokenTaggingData,
    )
    from finetune.parallel import fsdp2  # noqa: F401  (registers trainer.strategy: fsdp2)
    from finetune.tasks import (  # noqa: F401  (registers subclasses for short class names)
        ClassificationTask,
        MultiLabelClassificationTask,
        PreferenceTask,
        RegressionTask,
        Seq2SeqTask,
        SFTTask,
        TokenClassificationTask,
    )

    # Strategies are dataclasses, which jsonargparse accepts by `class_path` (LoRA, QLoRA, Partial ...)
    # only when subclassing is enabled for their base.
    set_parsing_settings(subclasses_enabled=[Strategy])

    config = next((value for flag, value in zip(argv, argv[1:]) if flag in ("--config", "-c")), None)
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
                    TrackRun(),
                    MetricsReport(),
                    ExportModel(),
                    PredictionWriter(),
                    RunReport(),
                    RestoreRNG(),
                    Preemption(),
                    StopOnNonFinite(),
                ],
                "enable_model_summary": False,
                # One validation batch before training still catches a broken validation step; Lightning's
                # two doubled its cost in time to the first step (measured on MiniLM, bench.parity_profile).
                "num_sanity_val_steps": 1,
            },
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            config_path=Path(config) if config else None,
            plan=plan,
            run=run,
            args=argv,
        )
    except ArgumentError as error:  # jsonargparse's report of a bad key or value
        raise _recipe_error_in(error) or explain_parse_error(str(error)) from error
    except Exception as error:
        # jsonargparse wraps errors raised while it instantiates classes; surface ours unwrapped.
        found = _recipe_error_in(error) or _recipe_value_failure(error)
        if found is None:
            raise
        raise found from error


def _recipe_value_failure(error: BaseException) -> RecipeError | None:
    """Library errors whose cause is a recipe value: a value jsonargparse refused while building a class, or
    a checkpoint (``--ckpt_path``) of another model."""
    text = str(error)
    if "Does not validate against any of the Union subtypes" in text:
        return explain_parse_error(text)
    mismatch = next((line.strip() for line in text.splitlines() if "size mismatch for" in line), None)
    if mismatch:
        return RecipeError(
            "ckpt_path",
            f"the checkpoint was trained for another model or label set ({mismatch}); give one of this recipe's",
        )
    return None


def _recipe_error_in(error: BaseException) -> RecipeError | None:
    """The RecipeError that ``error`` is, or was raised from, if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, RecipeError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
