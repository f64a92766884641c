"""Experiment trackers: Lightning's loggers (TensorBoard, MLflow, W&B ...) beside the CSV logger that makes the run
folder, placed with the run when the recipe leaves their location to Lightning's defaults, and given the run's
recipe and plan."""

from __future__ import annotations

import inspect
import json
import os
import re
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from typing_extensions import override

from finetune import runs

# A logger class and the init args a recipe gives it.
LoggerSpec = tuple[type[Logger], Mapping[str, Any]]


def run_loggers(trackers: list[LoggerSpec], root: Path, name: str) -> list[Logger]:
    """The run's loggers: first the CSV logger whose folder ``root/name/version_N`` is the run folder (a
    ``CSVLogger`` among ``trackers`` takes its place), then the other ``trackers``, all of the same version.
    Init args a tracker leaves at Lightning's defaults become the run's (``placement``); those it sets are kept.
    """
    first = next((i for i, (cls, _) in enumerate(trackers) if issubclass(cls, CSVLogger)), None)
    csv_class, csv_args = trackers[first] if first is not None else (CSVLogger, {})
    folder = _build(csv_class, csv_args, placement(csv_class, csv_args, root, name, None))
    version = folder.version  # the next free version_N, read before anything is written
    rest = [spec for i, spec in enumerate(trackers) if i != first]
    return [folder, *(_build(cls, args, placement(cls, args, root, name, version)) for cls, args in rest)]


def placement(
    cls: type[Logger], given: Mapping[str, Any], root: Path, name: str, version: int | str | None
) -> dict[str, Any]:
    """Where a logger of class ``cls`` (given init args ``given``) writes by default, for run ``version`` of
    recipe ``name``:

    - CSV: the run folder ``root/name/version_N`` itself (``version`` None: the next free one);
    - TensorBoard: ``<run folder>/tensorboard`` (``tensorboard --logdir runs`` shows every run);
    - MLflow, whose store holds many runs: the SQLite store ``root/mlruns/mlflow.db`` with artifacts in
      ``root/mlruns/artifacts`` (MLflow 3 refuses its file store), experiment ``name``, run ``version_N``
      tagged with its ``run_dir``; a ``tracking_uri`` or ``MLFLOW_TRACKING_URI`` (a server) wins;
    - W&B: ``<run folder>/wandb``, project ``name``, run ``version_N``;
    - any other logger: where its own arguments say.
    """
    run = root / name / f"version_{version}"
    if issubclass(cls, CSVLogger):
        return {"save_dir": str(root), "name": name, "version": version}
    if issubclass(cls, TensorBoardLogger):
        return {"save_dir": str(root), "name": name, "version": version, "sub_dir": runs.TENSORBOARD}
    if issubclass(cls, MLFlowLogger):
        placed = {"experiment_name": name, "run_name": run.name, "tags": {"run_dir": str(run.resolve())}}
        if given.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"):
            return placed
        store = (root / runs.MLRUNS).resolve()
        store.mkdir(parents=True, exist_ok=True)  # SQLite makes its file, not the folder
        return placed | {
            "tracking_uri": f"sqlite:///{store / runs.MLFLOW_DB}",
            "artifact_location": str(store / runs.MLFLOW_ARTIFACTS),
        }
    if issubclass(cls, WandbLogger):
        return {"save_dir": str(run), "project": name, "name": run.name}
    return {}


def _build(cls: type[Logger], given: Mapping[str, Any], placed: Mapping[str, Any]) -> Logger:
    """``cls(**given)``, with the ``placed`` value for each argument ``given`` leaves unset or at its default."""
    parameters = inspect.signature(cls).parameters
    args = dict(given)
    for key, value in placed.items():
        default = parameters[key].default if key in parameters else None
        if args.get(key) is None or args[key] == default:
            args[key] = value
    return cls(**args)


class TrackRun(pl.Callback):
    """Gives every tracker (each logger but the CSV ones, whose folder holds the files already) the run's
    resolved recipe and plan, read from the run folder (``finetune.runs.run_dir``):

    - at fit start, hyperparameters: ``config.yaml`` flattened (``optimizer.lr``,
      ``trainer.callbacks.0.class_path``), before Lightning logs the task's own (TensorBoard shows the first);
    - at train start, once ``plan.txt`` is written, the files ``config.yaml`` and ``plan.txt``: TensorBoard as
      text, MLflow as run artifacts, W&B as run files under ``version_N/`` (other loggers get the
      hyperparameters only).

    Contract: the CLI writes ``config.yaml`` when fit sets up and ``ParameterReport`` writes ``plan.txt`` at fit
    start; a file the run folder lacks (your own ``Trainer`` without them) is skipped.
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        config = runs.run_dir(trainer) / runs.CONFIG
        if not _trackers(trainer) or not config.is_file():
            return
        hyperparameters = flatten(yaml.safe_load(config.read_text()))
        for logger in _trackers(trainer):
            logger.log_hyperparams(hyperparameters)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = runs.run_dir(trainer) if _trackers(trainer) else None
        files = [run / name for name in (runs.CONFIG, runs.PLAN) if run and (run / name).is_file()]
        for logger in _trackers(trainer):
            attach = next((attach for kind, attach in ATTACH.items() if isinstance(logger, kind)), None)
            for path in files if attach else []:
                attach(logger, path)


def _trackers(trainer: pl.Trainer) -> list[Logger]:
    """The loggers other than CSV ones, on the process that logs (rank zero); none elsewhere."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if not isinstance(logger, CSVLogger)]


def flatten(recipe: Mapping[str, Any] | list[Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as one level of dotted keys: ``{"a": {"b": [1, 2]}}`` -> ``{"a.b.0": 1, "a.b.1": 2}``.

    Empty mappings and lists stay as ``{}``/``[]`` text; keys keep only the characters MLflow accepts in a
    name (letters, digits, ``_-. /``; others become ``_``).
    """
    flat: dict[str, Any] = {}
    items = recipe.items() if isinstance(recipe, Mapping) else enumerate(recipe)
    for key, value in items:
        name = prefix + re.sub(r"[^\w\-. /]", "_", str(key))
        if isinstance(value, (Mapping, list)) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (Mapping, list)) else value
    return flat


def _text(logger: TensorBoardLogger, path: Path) -> None:
    # TensorBoard renders text as Markdown; indented, it shows as written.
    logger.experiment.add_text(path.name, textwrap.indent(path.read_text(), "    "), global_step=0)


def _artifact(logger: MLFlowLogger, path: Path) -> None:
    logger.experiment.log_artifact(logger.run_id, str(path))


def _run_file(logger: WandbLogger, path: Path) -> None:
    # Under version_N/: W&B keeps its own config.yaml among the run's files.
    logger.experiment.save(str(path), base_path=str(path.parent.parent), policy="now")


# How each kind of tracker keeps a file of the run.
ATTACH: dict[type[Logger], Callable[[Any, Path], None]] = {
    TensorBoardLogger: _text,
    MLFlowLogger: _artifact,
    WandbLogger: _run_file,
}
