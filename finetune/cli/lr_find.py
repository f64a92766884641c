"""``python -m finetune lr-find RECIPE.yaml``: the learning-rate range test on the recipe's model, data and
parameter groups (``finetune.tuning.lr_find``), every group scaled together; prints the ``--optimizer.lr``
to pass and each group's LR with it, and writes ``<root>/<recipe>/lr_find/lr_find.png`` and ``lr_find.csv``.

Built as ``plan`` builds: on one device, without logger or checkpoints, so no run folder is written; the
model's weights are restored after the search. ``--batch-size-find`` first runs Lightning's batch-size
finder (doubling until out of memory: meant for an accelerator) and searches the LR at the size found.
"""

from __future__ import annotations

import csv
import json
import shlex
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.cli.recipe_file import read_recipe
from finetune.errors import RecipeError, require

if TYPE_CHECKING:
    from finetune.optim import OptimizerConfig
    from finetune.tuning.lr_find import LRSearch

USAGE = (
    "python -m finetune lr-find RECIPE.yaml [--min-lr 1e-7] [--max-lr 1] [--steps 100] [--batch-size-find] "
    "[--section.key=value ...]"
)
# This command's own options, and whether each takes a value; every other argument overrides the recipe.
OPTIONS = {"--min-lr": True, "--max-lr": True, "--steps": True, "--batch-size-find": False}
FOLDER = "lr_find"
PLOT = "lr_find.png"
TABLE = "lr_find.csv"


def split_argv(
    argv: list[str], options: Mapping[str, bool], command: str, usage: str
) -> tuple[str, list[str], list[str]]:
    """``RECIPE.yaml ARGS`` -> (the recipe, the command's own options, the recipe overrides).

    ``options`` maps each own option to whether it takes a value (``--steps 50`` or ``--steps=50``); every
    other argument is a recipe override (``--section.key=value`` or ``--section.key value``).
    """
    require(bool(argv) and argv[0].endswith((".yaml", ".yml")), command, f"give a recipe: {usage}")
    own: list[str] = []
    overrides: list[str] = []
    position = 1
    while position < len(argv):
        argument = argv[position]
        name = argument.split("=", 1)[0]
        target = own if name in options else overrides
        target.append(argument)
        takes_value = options.get(name, True) and argument.startswith("--") and "=" not in argument
        following = argv[position + 1] if position + 1 < len(argv) else None
        if takes_value and following is not None and (name in options or not following.startswith("--")):
            target.append(following)
            position += 1
        position += 1
    return argv[0], own, overrides


def parse_options(parser: Any, argv: list[str], command: str, usage: str) -> Any:
    """``parser.parse_args(argv)`` (a jsonargparse parser built with ``exit_on_error=False``); a bad option is a
    one-line RecipeError keyed by ``command``."""
    from argparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise RecipeError(command, f"{message}; usage: {usage}") from None


def _options(argv: list[str]) -> Any:
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="python -m finetune lr-find", exit_on_error=False)
    parser.add_argument("--min-lr", type=float, default=1e-7, help="the lowest base LR tried")
    parser.add_argument("--max-lr", type=float, default=1.0, help="the highest base LR tried")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the search")
    parser.add_argument(
        "--batch-size-find", action=ActionYesNo, default=False, help="find the largest batch size first"
    )
    return parse_options(parser, argv, "lr-find", USAGE)


def main(argv: list[str]) -> int:
    """Search the LR, write the plot and the table, print the override and each group's LR."""
    recipe, own, overrides = split_argv(argv, OPTIONS, "lr-find", USAGE)
    args = _options(own)
    read_recipe(Path(recipe))
    from lightning.pytorch.cli import SaveConfigCallback

    from finetune.callbacks import RunReport
    from finetune.cli.lightning import run_cli
    from finetune.optim import OptimizerConfig
    from finetune.tuning.lr_find import check_search, find_batch_size, find_lr, plot_search

    check_search(args.min_lr, args.max_lr, args.steps)  # before the model is built

    cli = run_cli(["--config", recipe, *overrides], run=False, plan=True)
    # Plan mode has no logger and no checkpoints; the saved config (in setup) and the run report (in
    # teardown, which ending fit early still calls) are the writers left, so they go.
    writers = (SaveConfigCallback, RunReport)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, writers)]
    if args.batch_size_find:
        size = find_batch_size(cli.trainer, cli.model, cli.datamodule)
        print(f"Largest batch size that trained: {size}\n  --data.init_args.batch_size={size}\n")
    config = OptimizerConfig(**cli.config.optimizer.as_dict())
    search = find_lr(
        cli.trainer,
        cli.model,
        cli.datamodule,
        base_lr=config.lr,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        steps=args.steps,
    )
    folder = Path(cli.config.trainer.default_root_dir or "runs") / cli.run_name / FOLDER
    plot = plot_search(search, folder / PLOT)
    _write_table(search.lrs, search.losses, folder / TABLE)
    require(
        search.suggestion is not None,
        "--steps",
        f"the search stopped after {len(search.lrs)} steps (the loss diverged), too few to suggest an LR; "
        f"raise --steps or lower --max-lr (curve: {plot})",
    )
    print(_report(search, config, f"{search.suggestion:.3g}"))
    print(f"\nPlot: {plot}\nLoss per step: {folder / TABLE}")
    return 0


def _report(search: LRSearch, config: OptimizerConfig, suggestion: str) -> str:
    """The overrides to pass and each group's LR with them (the suggestion as printed, rounded)."""
    from finetune.display import table
    from finetune.tuning.lr_find import scaled_optimizer

    lr = float(suggestion)
    overrides = [f"--optimizer.lr={suggestion}"]
    scaled = scaled_optimizer(config, lr)
    if any(group.lr is not None for group in config.groups):
        groups = [{k: v for k, v in asdict(group).items() if v is not None} for group in scaled.groups]
        overrides.append(shlex.quote(f"--optimizer.groups={json.dumps(groups)}"))
    rows = [
        [name, f"{ratio:.4g}", f"{group_lr:.3g}"]
        for name, ratio, group_lr in zip(search.groups, search.ratios, search.group_lrs(lr))
    ]
    steps = f"{len(search.lrs)} steps from {search.lrs[0]:.2g} to {search.lrs[-1]:.2g}"
    return "\n".join(
        [
            f"Suggested learning rate: {suggestion} (steepest fall of the loss; {steps})",
            f"  {' '.join(overrides)}",
            "",
            "Parameter groups with it (each keeps its ratio to optimizer.lr):",
            table(["group", "ratio", "lr"], rows),
        ]
    )


def _write_table(lrs: list[float], losses: list[float], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["lr", "loss"])
        writer.writerows(zip(lrs, losses))
