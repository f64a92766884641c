"""``python -m finetune export RUN_DIR [--merge] [--out DIR] [--push-to-hub REPO_ID]``: export a run's model
from its checkpoint, with its model card; optionally upload the folder to the Hugging Face Hub."""

from __future__ import annotations

import logging
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from finetune import runs
from finetune.errors import RecipeError

log = logging.getLogger(__name__)
USAGE = "python -m finetune export RUN_DIR [--merge] [--out DIR] [--push-to-hub REPO_ID]"


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
    parser.add_argument(
        "--push-to-hub",
        type=str | None,
        default=None,
        help="upload the export folder to this Hugging Face model repository (created if missing); needs a login",
    )
    return parser


def main(argv: list[str]) -> int:
    """Rebuild the run's task from its best checkpoint (else its last), export it with its model card, and
    push the folder when asked (the Hub login is checked before anything is exported)."""
    from finetune.export import hub_client, push_folder
    from finetune.report.card import write_card

    try:
        args = _parser().parse_args(argv)
    except ArgumentError as error:
        raise RecipeError("export", f"{error}; usage: {USAGE}") from None
    run = Path(args.run_dir)
    if not run.is_dir():
        raise RecipeError(
            runs.KEY, f"{run} is not a folder; give a run folder such as runs/<recipe>/version_0"
        )
    out = Path(args.out) if args.out else run / (f"{runs.EXPORT}-merged" if args.merge else runs.EXPORT)
    if out.exists() and not out.is_dir():
        raise RecipeError("--out", f"{out} is a file; give a folder (an existing export folder is replaced)")
    hub = hub_client() if args.push_to_hub else None
    task = runs.load_run(run)
    directory = task.export(out, merge=args.merge)
    write_card(task, run, directory)
    log.info("Exported %s to %s", "the merged model" if args.merge else "the model", directory)
    if hub is not None:
        url = push_folder(hub, directory, args.push_to_hub)
        print(f"Pushed {directory} to {url}")
    return 0
