"""``python -m finetune export RUN_DIR [--merge] [--out DIR]``: export a run's model from its checkpoint.

The task is rebuilt from the checkpoint's hyperparameters (plain data, read with ``weights_only=True``)
and the class named in the run's ``config.yaml``; the best checkpoint wins over ``last.ckpt``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RecipeError

log = logging.getLogger(__name__)
KEY = "RUN_DIR"


def _parser() -> Any:
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog="python -m finetune export",
        description="Export a run's model: its adapters (peft format), or with --merge a plain model.",
        exit_on_error=False,
    )
    parser.add_argument("run_dir", type=str, help="a run folder: runs/<recipe>/version_N")
    parser.add_argument(
        "--merge",
        action=ActionYesNo,
        default=False,
        help="merge adapters into the weights (dequantised for qlora) and save a plain model",
    )
    parser.add_argument(
        "--out", type=str | None, default=None, help="output folder (default RUN_DIR/export[-merged])"
    )
    return parser


def find_checkpoint(run: Path) -> Path:
    """The run's best checkpoint, else its last; RecipeError naming RUN_DIR when it has none."""
    if not (run / "config.yaml").is_file():
        raise RecipeError(KEY, f"{run} is not a run folder (no config.yaml); give runs/<recipe>/version_N")
    best = sorted((run / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = run / "checkpoints" / "last.ckpt"
    if best:
        return best[-1]
    if last.is_file():
        return last
    raise RecipeError(KEY, f"{run} has no checkpoints/*.ckpt; train it first (or give another run)")


def _task_class(run: Path) -> type:
    from finetune.tasks import FinetuneTask

    config = yaml.safe_load((run / "config.yaml").read_text())
    class_path = (config.get("model") or {}).get("class_path", "")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, FinetuneTask)):
        raise RecipeError(KEY, f"{run}/config.yaml names model {class_path!r}, not a finetune task")
    return cls


def load_run(run: Path) -> Any:
    """The run's task with its model built and the checkpoint's weights loaded."""
    import torch

    path = find_checkpoint(run)
    cls = _task_class(run)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    accepted = inspect.signature(cls.__init__).parameters
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    task = cls(**hparams)
    task.configure_model()
    task.load_weights(checkpoint["state_dict"])
    return task


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except ArgumentError as error:
        raise RecipeError(
            "export", f"{error}; usage: python -m finetune export RUN_DIR [--merge] [--out DIR]"
        ) from None
    run = Path(args.run_dir)
    if not run.is_dir():
        raise RecipeError(KEY, f"{run} is not a folder; give a run folder such as runs/<recipe>/version_0")
    out = Path(args.out) if args.out else run / ("export-merged" if args.merge else "export")
    task = load_run(run)
    directory = task.export(out, merge=args.merge)
    log.info("Exported %s to %s", "the merged model" if args.merge else "the model", directory)
    return 0
