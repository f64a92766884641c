"""Plots and report.html: the curves' axes and data, the learning rates per group, the confusion matrix against
one counted by hand, precision-recall curves, the page's sections and embedded images, and
``python -m finetune report RUN_DIR`` redrawing them for an existing run."""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.callbacks import RunReport
from finetune.cli import report as report_command
from finetune.data import TextClassificationData
from finetune.errors import RecipeError
from finetune.report import PLOTS, REPORT, VAL_PREDICTIONS, write_report
from finetune.report.metrics import exported_metrics, read_metrics
from finetune.report.plots import (
    confusion_matrix,
    curve_figures,
    precision_recall,
    run_figures,
)
from finetune.tasks import ClassificationTask, MultiLabelClassificationTask
from tests.helpers.targets import trainer, write_reviews

pytestmark = pytest.mark.slow

DRAWN = ["acc.png", "confusion_matrix.png", "f1.png", "loss.png"]


def labels_of(line_owner) -> set[str]:
    return {line.get_label() for line in line_owner.get_lines()}


def test_fit_writes_one_png_per_figure(report_run):
    pngs = sorted((report_run / PLOTS).glob("*.png"))
    assert [p.name for p in pngs] == DRAWN
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


def test_learning_rates_are_logged_per_group_every_step(report_run):
    frame = read_metrics(report_run)
    rates = [column for column in frame.columns if column.startswith("lr/")]
    plan = (report_run / "plan.txt").read_text()
    assert rates and all(column.removeprefix("lr/") in plan for column in rates)  # the groups, by name
    steps = frame.dropna(subset=[rates[0]])["step"].astype(int).tolist()
    assert steps == list(range(len(frame["train/loss"].dropna())))  # log_every_n_steps: 1
    logged = frame[rates].to_numpy()
    assert np.allclose(logged[~np.isnan(logged)], 0.003)  # a constant schedule at the recipe's lr


def test_curves_put_train_and_val_on_one_figure_and_the_lr_on_a_second_axis(report_run):
    frame = read_metrics(report_run)
    figures = curve_figures(frame)
    assert set(figures) == {"loss", "acc", "f1"}
    axes, rate_axes = figures["loss"].axes
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("step", "loss")
    assert labels_of(axes) == {"train/loss", "val/loss"}
    val = next(line for line in axes.get_lines() if line.get_label() == "val/loss")
    np.testing.assert_allclose(val.get_ydata(), frame["val/loss"].dropna())
    assert len(val.get_xdata()) == 2  # one point per epoch
    assert rate_axes.get_ylabel() == "learning rate"
    assert labels_of(rate_axes) == {c for c in frame.columns if c.startswith("lr/")}
    (accuracy,) = figures["acc"].axes  # no learning rate beside the other metrics
    assert (accuracy.get_ylabel(), labels_of(accuracy)) == ("acc", {"train/acc", "val/acc"})


def test_the_confusion_matrix_is_the_validation_predictions_counted_by_hand(report_run):
    rows = pd.read_csv(report_run / VAL_PREDICTIONS)
    labels = json.loads((report_run / "labels.json").read_text())
    assert len(rows) == 20 and rows["index"].is_unique  # the whole validation split, each row once
    probabilities = rows[[f"p_{label}" for label in labels]].to_numpy()
    assert rows["prediction"].tolist() == [labels[i] for i in probabilities.argmax(1)]
    expected = np.zeros((len(labels), len(labels)))
    for target, predicted in zip(rows["target"], rows["prediction"]):
        expected[labels.index(target), labels.index(predicted)] += 1
    expected /= expected.sum(axis=1, keepdims=True)

    (axes, _colorbar) = run_figures(report_run)["confusion_matrix"].axes
    np.testing.assert_allclose(axes.images[0].get_array(), expected)
    assert [t.get_text() for t in axes.get_xticklabels()] == labels
    assert [t.get_text() for t in axes.get_yticklabels()] == labels
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted", "true")
    # The exported (best) checkpoint's predictions: their macro F1 is the one logged for its epoch.
    counts = pd.crosstab(rows["target"], rows["prediction"]).reindex(
        index=labels, columns=labels, fill_value=0
    )
    hits = np.diag(counts.to_numpy())
    f1 = 2 * hits / (counts.sum(axis=0).to_numpy() + counts.sum(axis=1).to_numpy())
    best = exported_metrics(read_metrics(report_run), ClassificationTask.monitor)
    assert f1.mean() == pytest.approx(best["val/f1"], abs=1e-6)


def test_confusion_matrix_rows_are_shares_of_each_true_class():
    rows = pd.DataFrame(
        {"target": ["a", "a", "a", "b", "c", "c"], "prediction": ["a", "b", "b", "b", "a", "c"]}
    )
    np.testing.assert_allclose(
        confusion_matrix(rows, ["a", "b", "c", "d"]),
        [[1 / 3, 2 / 3, 0, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 0]],
    )


def test_precision_recall_by_hand():
    # Thresholds 0.9, 0.8 (two rows at once), 0.3: 1, 3 and 4 rows called, 1, 2 and 2 of them positive.
    precision, recall, average = precision_recall(
        np.array([0.9, 0.8, 0.8, 0.3]), np.array([1.0, 0.0, 1.0, 0.0])
    )
    np.testing.assert_allclose(precision, [1, 2 / 3, 1 / 2])
    np.testing.assert_allclose(recall, [1 / 2, 1, 1])
    assert average == pytest.approx(1 / 2 * 1 + 1 / 2 * 2 / 3)


def test_a_multilabel_fit_draws_a_precision_recall_curve_per_label(tiny_bert_dir, tmp_path):
    reviews = write_reviews(tmp_path / "reviews.csv")
    data = TextClassificationData(
        train=str(reviews), backbone=str(tiny_bert_dir), label_column="tags", label_separator="|",
        val_fraction=0.25, batch_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    task = MultiLabelClassificationTask(str(tiny_bert_dir), optimizer={"lr": 3e-3})
    trainer(tmp_path, max_epochs=1, callbacks=[RunReport()]).fit(task, data)
    run = tmp_path / "lightning_logs" / "version_0"

    rows = pd.read_csv(run / VAL_PREDICTIONS)
    val = data.split_dataset("val")
    batch = val.collate(val.__getitems__(list(range(len(val)))))
    targets = batch["labels"][torch.argsort(batch["index"])]
    for i, label in enumerate(task.labels):  # the truth is the split's, row by row
        assert rows[f"target_{label}"].tolist() == targets[:, i].int().tolist()

    (axes,) = run_figures(run)["precision_recall"].axes
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("recall", "precision")
    curves = {line.get_label().split(" (AP")[0]: line for line in axes.get_lines()}
    drawn = [label for label in task.labels if rows[f"target_{label}"].sum() > 0]
    assert sorted(curves) == sorted(drawn) and drawn
    for label in drawn:
        precision, recall, _ = precision_recall(
            rows[f"p_{label}"].to_numpy(), rows[f"target_{label}"].to_numpy()
        )
        np.testing.assert_allclose(curves[label].get_xdata(), recall)
        np.testing.assert_allclose(curves[label].get_ydata(), precision)
    assert (run / PLOTS / "precision_recall.png").is_file() and (run / REPORT).is_file()


def test_report_html_holds_recipe_plan_final_metrics_then_embedded_plots(report_run):
    page = (report_run / REPORT).read_text()
    for name in ("config.yaml", "plan.txt", "metrics_fit.txt", "metrics_test.txt"):
        assert html.escape((report_run / name).read_text()) in page, name
    headings = [page.index(f"<h2>{title}</h2>") for title in ("Recipe", "Plan", "Final metrics", "Plots")]
    assert headings == sorted(headings)
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == len(DRAWN)
    for source in images:  # self-contained: nothing but data URIs
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.partition(",")[2]).startswith(b"\x89PNG")


def test_the_report_command_redraws_an_existing_run(report_run, tmp_path, capsys):
    run = shutil.copytree(report_run, tmp_path / "run")
    shutil.rmtree(run / PLOTS)
    (run / REPORT).unlink()
    assert report_command.main([str(run)]) == 0
    assert sorted(p.name for p in (run / PLOTS).glob("*.png")) == DRAWN
    page = (run / REPORT).read_text()
    assert html.escape((run / "config.yaml").read_text()) in page
    assert page.count("data:image/png;base64,") == len(DRAWN)
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / PLOTS / name) for name in DRAWN] + [str(run / REPORT)]


def test_the_report_command_refuses_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(RecipeError) as error:
        report_command.main([str(tmp_path)])
    assert error.value.key == "RUN_DIR"
    with pytest.raises(RecipeError, match="give one run folder"):
        report_command.main([])


def test_without_matplotlib_the_report_is_written_without_plots(report_run, tmp_path, monkeypatch, caplog):
    run = shutil.copytree(report_run, tmp_path / "run")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "matplotlib" else find_spec(name, *rest),
    )
    with caplog.at_level(logging.WARNING, logger="finetune"):
        page = write_report(run).read_text()
    assert "<h2>Recipe</h2>" in page and "<img" not in page
    assert [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()] == [
        f"matplotlib is not installed: no plots for {run} (pip install matplotlib)"
    ]
