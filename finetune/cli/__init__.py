"""The command line: ``python -m finetune RECIPE.yaml``, the Lightning CLI subcommands, and our own commands
(``plan``, ``export``, ``report``, ``lr-find``, ``sweep``).

The only layer that parses argv or prints; the library never imports it.

``--help`` and recipe-file errors are answered before Lightning is imported (that import takes seconds).
Bad recipe values end in one line naming the key, with exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

from finetune.cli.recipe_file import read_recipe
from finetune.errors import RecipeError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
PREEMPTED = 143  # 128 + SIGTERM, as a shell reports a process ended by it
# Commands of our own: name -> "module:function"; the function takes the remaining argv, returns an exit code.
COMMANDS: dict[str, str] = {
    "export": "finetune.cli.export:main",
    "lr-find": "finetune.cli.lr_find:main",
    "plan": "finetune.cli.plan:main",
    "report": "finetune.cli.report:main",
    "sweep": "finetune.cli.sweep:main",
}

HELP = """\
usage: python -m finetune RECIPE.yaml [--section.key=value ...]
       python -m finetune {fit,validate,test,predict} --config RECIPE.yaml [--section.key=value ...]
       python -m finetune plan RECIPE.yaml [--section.key=value ...]
       python -m finetune export RUN_DIR [--merge] [--out DIR] [--push-to-hub REPO_ID]
       python -m finetune report RUN_DIR
       python -m finetune lr-find RECIPE.yaml [--min-lr 1e-7] [--max-lr 1] [--steps 100] [--batch-size-find]
       python -m finetune sweep RECIPE.yaml --space SPACE.yaml --trials N [--study-name NAME]
                                [--direction auto|maximize|minimize] [--pruner median|none]

Fine-tune a pretrained timm or Hugging Face model from a recipe (a Lightning CLI config with the
sections trainer, model, data, optimizer, lr_scheduler).

commands:
  RECIPE.yaml    same as `fit --config RECIPE.yaml`
  fit            train, validate each epoch, export the model into the run folder
  validate       evaluate on the validation split
  test           evaluate on the test split
  predict        write predictions.csv into the run folder
  export         write a run's model again: adapters alone (peft format), or --merge for a plain model
  plan           build model and optimizer from a recipe, print the run plan (LRs, schedule, memory)
  report         redraw a run's plots and report.html from its files
  lr-find        LR range test with every parameter group scaled together: plot, and the --optimizer.lr to pass
  sweep          Optuna search over the recipe keys of a space file; each trial a run folder; the study resumes

`python -m finetune fit --help` lists every recipe key with its type and default.
Runs are written to runs/<recipe name>/version_N (resolved recipe, metrics, checkpoints, export).
"""


def _fail(message: str) -> int:
    print(f"finetune: error: {message}", file=sys.stderr)
    return 2


def _recipe_args(argv: list[str]) -> list[str]:
    """Rewrite ``RECIPE.yaml ...`` to ``fit --config RECIPE.yaml ...``; check the named recipe files exist."""
    if argv[0] not in LIGHTNING_COMMANDS:
        if argv[0].startswith("-") or not argv[0].endswith((".yaml", ".yml")):
            known = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
            raise RecipeError(
                "command",
                f"unknown command {argv[0]!r}; give a recipe file or one of: {known}",
            )
        argv = ["fit", "--config", *argv]
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c"):
            read_recipe(Path(value))
    return argv


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (callers, tests among them, may replace it between runs)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_progress_messages() -> None:
    """Print finetune's INFO messages (tables, summaries) on stderr, as Lightning does its own."""
    logger = logging.getLogger("finetune")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    try:
        _show_progress_messages()
        if argv[0] in COMMANDS:
            module, _, function = COMMANDS[argv[0]].partition(":")
            return getattr(importlib.import_module(module), function)(argv[1:])
        argv = _recipe_args(argv)
        from finetune.cli.lightning import run_cli  # heavy: imports Lightning

        run_cli(argv)
    except RecipeError as error:
        return _fail(str(error))
    except SystemExit as stop:
        if type(stop).__name__ == "SIGTERMException":  # preempted: a resumable checkpoint was saved
            return PREEMPTED
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
