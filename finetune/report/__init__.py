"""Views of a finished run folder: plots, ``report.html`` and the model card of an export.

Everything here reads the run's files (``metrics.csv``, ``config.yaml``, ``plan.txt``, ``labels.json``,
``val_predictions.csv``), never a live trainer, so ``python -m finetune report RUN_DIR`` rebuilds exactly
what ``RunReport`` wrote at the end of a fit. matplotlib is imported only when plots are drawn.
"""

from __future__ import annotations

from pathlib import Path

# The files this package adds to a run folder (beside those named in ``finetune.runs``).
PLOTS = "plots"  # one PNG per figure
REPORT = "report.html"  # recipe, plan, final metrics and plots in one self-contained page
VAL_PREDICTIONS = "val_predictions.csv"  # the exported model's validation predictions, with the targets
CARD = "README.md"  # the model card, in each export folder


def write_report(run: Path) -> Path:
    """(Re)write ``<run>/plots/*.png`` from the run's files, then ``<run>/report.html``; return the page.

    Without matplotlib the page is written without plots (one warning says so).
    """
    from finetune.report.html import write_html
    from finetune.report.plots import write_plots

    return write_html(run, write_plots(run))
