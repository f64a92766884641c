"""``python -m finetune sweep RECIPE.yaml --space SPACE.yaml --trials N``: a hyperparameter sweep over the
recipe keys of a space file (``finetune.tuning.space``), with Optuna (``finetune.tuning.study``).

Each trial is a whole run of the recipe with the sampled values as overrides, in its own run folder
(``<root>/<recipe>/version_N``); trials run one after another in this process, on one device. The study
lives in ``<root>/<recipe>/sweep/<study>/study.db``: a rerun resumes it and runs only the trials missing
to reach N finished (complete or pruned) ones. At the end the summary of every trial is printed and written
beside the study (``summary.csv``, ``summary.md``, ``importance.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune import runs
from finetune.cli.lr_find import parse_options, split_argv
from finetune.cli.recipe_file import _UniqueKeyLoader, read_recipe
from finetune.errors import RecipeError, first_line, require

if TYPE_CHECKING:
    from finetune.tuning.space import Dimension
    from finetune.tuning.study import Summary

USAGE = (
    "python -m finetune sweep RECIPE.yaml --space SPACE.yaml --trials N [--study-name NAME] "
    "[--direction auto|maximize|minimize] [--pruner median|none] [--section.key=value ...]"
)
OPTIONS = {"--space": True, "--trials": True, "--study-name": True, "--direction": True, "--pruner": True}
FOLDER = "sweep"


def _options(argv: list[str]) -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="python -m finetune sweep", exit_on_error=False)
    parser.add_argument("--space", type=str, required=True, help="the search space file (YAML)")
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should hold")
    parser.add_argument("--study-name", type=str | None, default=None, help="default: the space file's name")
    parser.add_argument("--direction", type=str, default="auto", help="auto: the task's monitor mode")
    parser.add_argument("--pruner", type=str, default="median", help="median or none")
    return parse_options(parser, argv, "sweep", USAGE)


def main(argv: list[str]) -> int:
    """Run the missing trials of the study, then print and write its summary."""
    recipe_path, own, overrides = split_argv(argv, OPTIONS, "sweep", USAGE)
    args = _options(own)
    recipe = read_recipe(Path(recipe_path))
    from finetune.tuning import parse_space
    from finetune.tuning.study import STORAGE, open_study, run_study, summarise

    space = parse_space(read_space(Path(args.space)), source=args.space)
    monitor = _monitor(recipe, overrides)
    direction = args.direction
    if direction == "auto":
        direction = "maximize" if monitor.mode == "max" else "minimize"
    name = args.study_name or Path(args.space).stem
    root = Path(_value(recipe, overrides, "trainer.default_root_dir") or "runs")
    folder = root / runs.recipe_name(Path(recipe_path)) / FOLDER / name
    seed = _value(recipe, overrides, "seed_everything")
    study = open_study(
        folder, name, direction, monitor.metric, args.pruner, seed if isinstance(seed, int) else None
    )
    before = len(study.trials)

    def run_trial(trial: Any, params: dict[str, Any]) -> float:
        sampled = [dimension.override(params[dimension.key]) for dimension in space]
        return _run_trial(recipe_path, [*overrides, *sampled], trial, monitor.metric)

    ran = run_study(study, space, args.trials, run_trial)
    import matplotlib

    matplotlib.use("Agg")  # the importance plot is a file: never a window, even where a display exists
    summary = summarise(study, folder)
    print(
        f"Study {name!r}: {len(study.trials)} trials ({ran} run now, {before} before), "
        f"objective {monitor.metric} ({direction}), stored in {folder / STORAGE}\n"
    )
    print(_report(summary, space))
    return 0


def _monitor(recipe: dict[str, Any], overrides: list[str]) -> Any:
    """The ``Monitor`` (metric and mode) of the recipe's task: the sweep's objective."""
    class_path = str(_value(recipe, overrides, "model.class_path"))
    # A short name (ClassificationTask) is one of the tasks the package exports, as the recipe parser takes it.
    task = runs.import_class(
        class_path if "." in class_path else f"finetune.{class_path}", "model.class_path"
    )
    monitor = getattr(task, "monitor", None)
    require(
        monitor is not None,
        "model.class_path",
        "a sweep needs a finetune task: its monitor metric is the objective",
    )
    return monitor


def read_space(path: Path) -> Any:
    """The space file's YAML (a key given twice is refused, as in a recipe); RecipeError naming ``--space``."""
    require(path.is_file(), "--space", f"space file {path} does not exist")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RecipeError("--space", f"{path}: not a YAML space file ({first_line(error)})") from None


def _value(recipe: dict[str, Any], overrides: list[str], key: str) -> Any:
    """A recipe value as the overrides leave it (``--key=value`` or ``--key value``, the last one wins)."""
    value: Any = recipe
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    flag = f"--{key}"
    for position, argument in enumerate(overrides):
        if argument.startswith(f"{flag}="):
            value = yaml.safe_load(argument.split("=", 1)[1])
        elif argument == flag and position + 1 < len(overrides):
            value = yaml.safe_load(overrides[position + 1])
    return value


def _run_trial(recipe: str, overrides: list[str], trial: Any, metric: str) -> float:
    """One trial: a whole run of ``recipe`` with ``overrides``, reporting ``metric`` to ``trial``.

    A recipe error while building stops the sweep (the space names a key or value the recipe refuses); an
    error while training (a diverging LR, out of memory) fails this trial alone.
    """
    from finetune.cli.lightning import run_cli
    from finetune.tuning.study import ERROR, RUN_DIR, TrialFailed, TrialReport

    cli = run_cli(["--config", recipe, *overrides], run=False)
    require(
        cli.trainer.world_size == 1,
        "trainer.devices",
        "a sweep trains its trials one after another in this process, on one device; set --trainer.devices=1",
    )
    report = TrialReport(trial, metric)
    cli.trainer.callbacks.append(report)
    try:
        # What `fit` runs (LightningCLI's subcommand): the run folder, training, then the test split.
        cli.before_fit()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if not report.pruned:
            cli.after_fit()
    except Exception as error:
        trial.set_user_attr(ERROR, first_line(error))
        raise TrialFailed(first_line(error)) from error
    finally:
        trial.set_user_attr(RUN_DIR, str(runs.run_dir(cli.trainer)))
    return report.result()


def _report(summary: Summary, space: list[Dimension]) -> str:
    """The summary table, the best trial with the overrides that rerun it, and the files written."""
    from finetune.tuning.study import RUN_DIR, markdown

    lines = [markdown(summary.header, summary.rows), ""]
    best = summary.best
    if best is not None:
        metric = summary.header[2]
        overrides = " ".join(d.override(best.params[d.key]) for d in space if d.key in best.params)
        lines += [
            f"Best: trial {best.number}, {metric} {best.value:.4g}, run {best.user_attrs.get(RUN_DIR, '')}",
            f"  {overrides}",
        ]
    lines.append("Written: " + ", ".join(str(path) for path in summary.files))
    return "\n".join(lines)
