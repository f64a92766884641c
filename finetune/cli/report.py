"""``python -m finetune report RUN_DIR``: rewrite a run's plots and ``report.html`` from its files."""

from __future__ import annotations

from pathlib import Path

from finetune import runs
from finetune.errors import RecipeError

USAGE = "python -m finetune report RUN_DIR"


def main(argv: list[str]) -> int:
    """Redraw ``RUN_DIR/plots/*.png`` and ``RUN_DIR/report.html`` (``finetune.report.write_report``) and print
    what was written. Nothing is trained or predicted: the plots show what the run's files hold."""
    if argv in (["-h"], ["--help"]):
        print(f"usage: {USAGE}\n\n{__doc__.splitlines()[0]}")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        raise RecipeError("report", f"give one run folder: {USAGE}")
    run = Path(argv[0])
    if not (run / runs.CONFIG).is_file():
        raise RecipeError(
            runs.KEY, f"{run} is not a run folder (no {runs.CONFIG}); give runs/<recipe>/version_N"
        )
    from finetune.report import PLOTS, write_report

    page = write_report(run)
    plots = sorted((run / PLOTS).glob("*.png"))
    for path in [*plots, page]:
        print(path)
    return 0
