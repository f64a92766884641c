"""The figures of a run: loss and metric curves (the learning rates on a second axis of the loss), the
confusion matrix of a classifier and the precision-recall curves of a multi-label classifier.

Each figure function returns a matplotlib ``Figure`` on the Agg canvas: no display, no pyplot state, so
it draws the same in a training job, a test and a notebook. ``write_plots`` saves every figure a run's
files support as ``<run>/plots/<name>.png``.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from finetune.report import PLOTS, VAL_PREDICTIONS
from finetune.report.metrics import curves, lr_curves, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

CONFUSION = "confusion_matrix"
PRECISION_RECALL = "precision_recall"
MARKED = 50  # curves of at most this many points show a marker per point (epoch-level metrics)
LEGEND = 12  # at most this many learning-rate groups or labels are named in a legend
ANNOTATED = 12  # confusion matrices of at most this many classes print each cell's value
TICKED = 50  # ... and of at most this many name each class on the axes


def write_plots(run: Path) -> list[Path]:
    """Save each figure of ``run_figures(run)`` as ``<run>/plots/<name>.png`` (removing the PNGs an earlier
    call left there) and return the paths; without matplotlib, one warning and no plots."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("matplotlib is not installed: no plots for %s (pip install matplotlib)", run)
        return []
    folder = Path(run) / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    paths = []
    for name, figure in run_figures(run).items():
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths


def run_figures(run: Path) -> dict[str, Figure]:
    """Every figure the run's files support, by name: one per metric logged for train or val (``loss``,
    ``acc`` ...), from ``metrics.csv``; ``confusion_matrix`` or ``precision_recall`` from
    ``val_predictions.csv`` (written by ``RunReport`` for classification and multi-label runs)."""
    run = Path(run)
    figures: dict[str, Figure] = {}
    frame = read_metrics(run)
    if frame is not None:
        figures.update(curve_figures(frame))
    if (run / VAL_PREDICTIONS).is_file():
        # Class names stay strings: "1" is not 1, and "NA" is a label, not a missing value.
        predictions = pd.read_csv(
            run / VAL_PREDICTIONS, dtype={"target": str, "prediction": str}, keep_default_na=False
        )
        labels = [column.removeprefix("p_") for column in predictions.columns if column.startswith("p_")]
        if "target" in predictions.columns:
            figures[CONFUSION] = confusion_figure(predictions, labels)
        elif labels and all(f"target_{label}" in predictions.columns for label in labels):
            figures[PRECISION_RECALL] = precision_recall_figure(predictions, labels)
    return figures


def curve_figures(frame: pd.DataFrame) -> dict[str, Figure]:
    """One figure per metric: its train and val curves against the optimizer step; the loss figure also
    draws each parameter group's learning rate on a second y axis (``learning rate``)."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    rates = lr_curves(frame)
    figures = {}
    for name, series in curves(frame).items():
        with_rates = name == "loss" and bool(rates)
        figure = new_figure(9.6 if with_rates else 6.4, 4.0)
        axes = figure.add_subplot()
        for curve in series:
            marker = "o" if len(curve.steps) <= MARKED else None
            axes.plot(curve.steps, curve.values, marker=marker, markersize=3, label=curve.column)
        axes.set(xlabel="step", ylabel=name, title=name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="best")
        if with_rates:
            twin = axes.twinx()
            # Shades of one colour map, dashed: the groups read as one family, apart from the metric's lines.
            shades = colormaps["viridis"].resampled(max(len(rates), 2))
            for i, curve in enumerate(rates):
                twin.plot(
                    curve.steps,
                    curve.values,
                    linestyle="--",
                    linewidth=1,
                    color=shades(i),
                    label=curve.column,
                )
            twin.set_ylabel("learning rate")
            if len(rates) <= LEGEND:
                figure.legend(handles=twin.get_lines(), loc="outside right upper", fontsize="small")
        figures[name] = figure
    return figures


def confusion_matrix(predictions: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """``(C, C)``: row ``i`` is the share of rows of true class ``labels[i]`` predicted as each class (rows
    sum to 1; a class without rows is all zeros). Reads the ``target`` and ``prediction`` columns."""
    position = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)))
    rows = predictions["target"].map(position).to_numpy(dtype=int)
    columns = predictions["prediction"].map(position).to_numpy(dtype=int)
    np.add.at(counts, (rows, columns), 1)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def confusion_figure(predictions: pd.DataFrame, labels: list[str]) -> Figure:
    """The row-normalised confusion matrix as an image: true class down, predicted class across."""
    matrix = confusion_matrix(predictions, labels)
    side = min(4 + 0.4 * len(labels), 20)
    figure = new_figure(side + 1, side)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    axes.set(
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix (validation, {len(predictions)} rows)",
    )
    if len(labels) <= TICKED:
        ticks = np.arange(len(labels))
        axes.set_xticks(ticks, labels, rotation=45, ha="right")
        axes.set_yticks(ticks, labels)
    if len(labels) <= ANNOTATED:
        for (i, j), share in np.ndenumerate(matrix):
            color = "white" if share > 0.5 else "black"
            axes.text(j, i, f"{share:.2f}", ha="center", va="center", color=color, fontsize="small")
    return figure


def precision_recall(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision and recall when a row is called positive at ``score >= t``, for each distinct score ``t``
    from the highest down, and the average precision ``Σ (Rₙ − Rₙ₋₁) Pₙ``. ``truth`` needs a positive row."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], np.cumsum(truth[order])
    called = np.arange(1, len(ranked) + 1)
    # Rows of equal score are called together: keep the last row of each run of equal scores.
    cut = np.append(ranked[:-1] > ranked[1:], True)
    precision, recall = hits[cut] / called[cut], hits[cut] / truth.sum()
    average = float(np.sum(np.diff(recall, prepend=0.0) * precision))
    return precision, recall, average


def precision_recall_figure(predictions: pd.DataFrame, labels: list[str]) -> Figure:
    """One precision-recall curve per label with a positive row (``target_<label>`` against ``p_<label>``),
    named with its average precision (AP)."""
    figure = new_figure(6.4, 5.0)
    axes = figure.add_subplot()
    for label in labels:
        truth = predictions[f"target_{label}"].to_numpy(dtype=float)
        if truth.sum() == 0:
            continue  # recall is undefined without a positive row
        precision, recall, average = precision_recall(predictions[f"p_{label}"].to_numpy(dtype=float), truth)
        axes.step(recall, precision, where="post", label=f"{label} (AP {average:.2f})")
    axes.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title=f"Precision-recall per label (validation, {len(predictions)} rows)",
    )
    if len(labels) <= LEGEND:
        axes.legend(loc="lower left", fontsize="small")
    return figure


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    """An empty figure on the Agg canvas (PNG without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure
