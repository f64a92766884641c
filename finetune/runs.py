"""The run folder: what a run writes where, finding it from a ``Trainer``, and loading a finished run.

A run lives in ``runs/<recipe name>/version_N/`` (the CSV logger's folder; the CSV logger comes first whatever
other loggers, trackers, a recipe adds). Everything that names a file in it is here, so the CLI, the
callbacks, the tasks and the distillation teacher agree on one layout.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune.errors import RecipeError

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from finetune.tasks import FinetuneTask

CONFIG = "config.yaml"  # the resolved recipe
PLAN = "plan.txt"
PARAMETERS = "parameters.txt"
LABELS = "labels.json"
PREDICTIONS = "predictions.csv"
SAMPLES = "samples.jsonl"
EXPORT = "export"
CHECKPOINTS = "checkpoints"
BEST = "best-epoch{epoch}-step{step}"  # ModelCheckpoint filename pattern; files start with "best-"
LAST = "last"
SHARDED_METADATA = "meta.pt"  # what Lightning's sharded checkpoint folders hold besides the shards
TENSORBOARD = "tensorboard"  # a TensorBoard tracker's folder in the run folder
MLRUNS = "mlruns"  # an MLflow tracker's store, beside the recipes' run folders (it holds many runs):
MLFLOW_DB = "mlflow.db"  # its SQLite database
MLFLOW_ARTIFACTS = "artifacts"  # and its artifacts
KEY = "RUN_DIR"


def recipe_name(config: Path) -> str:
    """The name a recipe's runs go under: the file's stem, or for a run's saved ``config.yaml`` (rerun or
    resumed) the name of the recipe that run came from."""
    if config.name == CONFIG and (config.parent / CHECKPOINTS).is_dir():
        return config.parent.parent.name
    return config.stem


def metrics_file(stage: str) -> str:
    """The final-metrics table of ``stage`` (``fit`` or ``test``)."""
    return f"metrics_{stage}.txt"


def run_dir(trainer: pl.Trainer) -> Path:
    """The run folder, without the collective call inside ``trainer.log_dir``.

    Under DDP ``trainer.log_dir`` broadcasts rank 0's folder; called from inside an
    ``if trainer.is_global_zero`` block it waits forever for the other ranks.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    directory = logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return Path(directory or trainer.default_root_dir)


def find_checkpoint(run: Path) -> Path:
    """The run's newest whole best checkpoint, else its last (damaged ones are skipped with a warning);
    RecipeError naming RUN_DIR when it has none."""
    from finetune.checkpoints import check_loadable, newest_loadable

    if not (run / CONFIG).is_file():
        raise RecipeError(KEY, f"{run} is not a run folder (no {CONFIG}); give runs/<recipe>/version_N")
    folder = run / CHECKPOINTS
    found = newest_loadable(folder.glob("best-*.ckpt"), KEY) or newest_loadable(
        folder.glob(f"{LAST}.ckpt"), KEY
    )
    if found is not None:
        return found
    present = sorted(folder.glob("*.ckpt"))
    if present:
        check_loadable(present[-1], KEY)  # every one is damaged: say how
    raise RecipeError(KEY, f"{run} has no {CHECKPOINTS}/*.ckpt; train it first (or give another run)")


def import_class(class_path: str, key: str) -> type:
    """The class a recipe names by ``class_path`` (``finetune.ClassificationTask``)."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        found = None
    if not isinstance(found, type):
        raise RecipeError(key, f"{class_path!r} is not an importable class; check its spelling")
    return found


def task_class(run: Path) -> type[FinetuneTask]:
    """The task class named by the run's saved recipe."""
    from finetune.tasks import FinetuneTask

    config = yaml.safe_load((run / CONFIG).read_text())
    class_path = (config.get("model") or {}).get("class_path", "")
    cls = import_class(class_path, KEY)
    if not issubclass(cls, FinetuneTask):
        raise RecipeError(KEY, f"{run}/{CONFIG} names model {class_path!r}, not a finetune task")
    return cls


def load_run(run: Path) -> FinetuneTask:
    """The run's task with its model built and its (best) checkpoint's weights loaded, on the CPU."""
    return load_checkpoint(find_checkpoint(run), task_class(run))


def load_checkpoint(path: Path, cls: type[FinetuneTask]) -> FinetuneTask:
    """A ``cls`` task rebuilt from checkpoint ``path``'s hyperparameters (plain data, read with
    ``weights_only=True``) with its weights loaded, on the CPU, in one process.

    ``path`` is a checkpoint file, or the folder a sharded run (``fsdp2``) writes: its shards are
    consolidated into the rebuilt model here, without a process group or a GPU.
    """
    import torch

    sharded = path.is_dir()
    checkpoint: dict[str, Any] = torch.load(
        path / SHARDED_METADATA if sharded else path, map_location="cpu", weights_only=True
    )
    hparams = checkpoint["hyper_parameters"]
    parameters = inspect.signature(cls.__init__).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        # Checkpoints of older versions may carry hyperparameters the class no longer takes.
        hparams = {k: v for k, v in hparams.items() if k in {p.name for p in parameters}}
    task = cls(**hparams)
    task.configure_model()
    task.load_weights(_sharded_weights(path, task) if sharded else checkpoint["state_dict"])
    return task


def _sharded_weights(path: Path, task: FinetuneTask) -> dict[str, Any]:
    """The weights of a sharded checkpoint folder, read into tensors shaped like ``task``'s own."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    stored = {key.partition(".")[2] for key in metadata.state_dict_metadata if key.startswith("state_dict.")}
    own = task.state_dict()
    weights = {name: tensor.clone() for name, tensor in own.items() if name in stored}
    dcp.load({"state_dict": weights}, checkpoint_id=str(path), no_dist=True)
    return weights
