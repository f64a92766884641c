"""A sweep's study: Optuna's TPE sampler over a search space, median pruning, SQLite storage in the sweep
folder, one run per trial, and the summary at the end.

The sweep folder holds ``study.db`` (the Optuna study: a rerun resumes it), ``summary.csv`` and
``summary.md`` (every trial: state, objective, sampled values, run folder) and ``importance.png`` (Optuna's
parameter importances, from two completed trials on). Trials run one after another in one process; each is
a whole run of its own (``run_trial``), reporting its monitored metric through ``TrialReport``.
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
from optuna.trial import TrialState
from typing_extensions import override

from finetune.errors import require
from finetune.tuning.space import Dimension

log = logging.getLogger(__name__)

STORAGE = "study.db"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
IMPORTANCE = "importance.png"
RUN_DIR = "run_dir"  # trial user attribute: the trial's run folder
ERROR = "error"  # trial user attribute: why a trial failed
METRIC = "metric"  # study user attribute: the objective's metric
PRUNERS = ("median", "none")
DIRECTIONS = ("maximize", "minimize")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialFailed(Exception):
    """A trial's run ended in an error (a diverging LR, say): the study records it as failed and goes on."""


class TrialReport(pl.Callback):
    """Reports ``metric`` to an Optuna trial after every validation, keeps the values, and when the study's
    pruner says so, ends the run after that validation's epoch: a normal end (checkpoints, export, metrics
    as any run), the trial then recorded as pruned (``result``).

    Contract: the module logs ``metric`` in validation (a finetune task's ``monitor.metric``); the study's
    direction says which value is best. Values are reported at step 0, 1, ... (one per validation, the
    sanity check aside), which is what the median pruner compares across trials. It keeps nothing in
    checkpoints: a trial lives in the process that runs it and is not resumed.
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.maximize = trial.study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.values: list[float] = []
        self.pruned = False

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=len(self.values))
        self.values.append(float(value))
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True

    def result(self) -> float:
        """The best value of the run; raises ``optuna.TrialPruned`` for a pruned run, ``TrialFailed`` when no
        value was finite, ``RecipeError`` when the metric was never logged."""
        if self.pruned:
            raise optuna.TrialPruned(f"pruned after validation {len(self.values)}")
        require(
            bool(self.values),
            "trainer.limit_val_batches",
            f"the sweep's objective {self.metric} was never logged; validate during training",
        )
        finite = [value for value in self.values if math.isfinite(value)]
        if not finite:
            raise TrialFailed(f"{self.metric} was never finite")
        return max(finite) if self.maximize else min(finite)


def open_study(
    folder: Path, name: str, direction: str, metric: str, pruner: str, seed: int | None
) -> optuna.Study:
    """The study ``name`` in ``folder/study.db``: created, or loaded with its trials when it exists (same
    direction required). TPE sampling (seeded by ``seed`` plus the trials already there, so a resumed study
    does not repeat its first random draws); ``pruner`` ``median`` (Optuna's defaults: from the 6th trial,
    a run below the median of the others at the same validation stops) or ``none``."""
    require(
        direction in DIRECTIONS, "--direction", f"{direction!r} is not one of auto, {', '.join(DIRECTIONS)}"
    )
    require(pruner in PRUNERS, "--pruner", f"{pruner!r} is not one of {', '.join(PRUNERS)}")
    folder.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        storage=f"sqlite:///{(folder / STORAGE).resolve()}",
        study_name=name,
        direction=direction,
        pruner=optuna.pruners.MedianPruner() if pruner == "median" else optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    existing = study.direction.name.lower()
    require(
        existing == direction,
        "--direction",
        f"study {name!r} in {folder} was made to {existing}; give --direction {existing} or another --study-name",
    )
    known = study.user_attrs.get(METRIC)
    require(
        known in (None, metric),
        "--study-name",
        f"study {name!r} optimises {known}, this recipe's task {metric}; give another --study-name",
    )
    study.set_user_attr(METRIC, metric)
    study.sampler = optuna.samplers.TPESampler(seed=None if seed is None else seed + len(study.trials))
    return study


def finished(study: optuna.Study) -> int:
    """How many trials of the study are complete or pruned."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_study(
    study: optuna.Study,
    space: list[Dimension],
    trials: int,
    run_trial: Callable[[optuna.Trial, dict[str, Any]], float],
) -> int:
    """Run trials one after another until the study holds ``trials`` finished (complete or pruned) ones;
    return how many ran now (failed ones included, each run once).

    ``run_trial(trial, params)`` trains one run with the sampled ``params`` (recipe key -> value) and
    returns its objective; it raises ``optuna.TrialPruned`` for a pruned run and ``TrialFailed`` for a failed
    one (recorded, the sweep goes on); any other exception ends the sweep, its trial recorded as failed.
    """
    require(trials >= 1, "--trials", f"must be 1 or more, got {trials}")
    missing = max(trials - finished(study), 0)
    for _ in range(missing):
        # Ask and tell rather than study.optimize: a failed trial is one line here, not Optuna's traceback.
        trial = study.ask()
        params = {dimension.key: dimension.suggest(trial) for dimension in space}
        try:
            value = run_trial(trial, params)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            log.info("Trial %d pruned: %s", trial.number, _params(params))
        except TrialFailed as error:
            study.tell(trial, state=TrialState.FAIL)
            log.warning("Trial %d failed (%s): %s", trial.number, error, _params(params))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)
            log.info(
                "Trial %d: %s %.4g, %s", trial.number, study.user_attrs.get(METRIC), value, _params(params)
            )
        finally:
            gc.collect()  # the trial's model and data go before the next trial builds its own
    return missing


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_cell(value)}" for key, value in params.items())


@dataclass(frozen=True)
class Summary:
    """Every trial of a study, as written to ``summary.csv``/``summary.md``, and the importance plot."""

    header: list[str]
    rows: list[list[str]]
    best: optuna.trial.FrozenTrial | None
    files: list[Path]


def summarise(study: optuna.Study, folder: Path) -> Summary:
    """Write ``summary.csv``, ``summary.md`` and (from two completed trials on) ``importance.png`` into
    ``folder``: one row per trial with its number, state, objective, sampled values and run folder."""
    metric = study.user_attrs.get(METRIC, "value")
    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(key for trial in trials for key in trial.params))
    header = ["trial", "state", metric, *keys, "run folder"]
    rows = [
        [
            str(trial.number),
            trial.state.name.lower(),
            "" if trial.value is None else f"{trial.value:.4g}",
            *(_cell(trial.params.get(key)) for key in keys),
            str(trial.user_attrs.get(RUN_DIR, "")),
        ]
        for trial in trials
    ]
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / SUMMARY_CSV).open("w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    (folder / SUMMARY_MD).write_text(markdown(header, rows) + "\n")
    files = [folder / SUMMARY_CSV, folder / SUMMARY_MD]
    importance = plot_importance(study, folder / IMPORTANCE)
    if importance is not None:
        files.append(importance)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return Summary(header, rows, study.best_trial if complete else None, files)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_importance(study: optuna.Study, path: Path) -> Path | None:
    """Optuna's parameter-importance plot (its matplotlib backend) as a png, or None with fewer than two
    completed trials or when Optuna cannot tell importances apart (every trial scored the same)."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_param_importances

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        log.info("Parameter importances need two completed trials; no %s yet", path.name)
        return None
    # Optuna sets a plot style through pyplot; keep it to this figure.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            axes = plot_param_importances(study)
        except (RuntimeError, ValueError) as error:
            log.warning("No parameter importances: %s", error)
            return None
        axes.figure.tight_layout()
        axes.figure.savefig(path, dpi=100)
        plt.close(axes.figure)
    return path
