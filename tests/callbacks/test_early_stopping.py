"""Early stopping from a recipe is Lightning's ``EarlyStopping`` on a metric the task logs, in the direction that
metric improves; a run whose metric cannot improve stops before ``max_epochs``."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from finetune.cli import main
from finetune.cli.lightning import metric_mode
from finetune.tasks import (
    ClassificationTask,
    MultiLabelClassificationTask,
    PreferenceTask,
    RegressionTask,
    Seq2SeqTask,
    SFTTask,
    TokenClassificationTask,
)
from tests.helpers.recipes import text_recipe, write

MAX, MIN = "max", "min"
DIRECTIONS = {
    ClassificationTask: {"val/loss": MIN, "val/acc": MAX, "val/f1": MAX},
    MultiLabelClassificationTask: {"val/loss": MIN, "val/f1_micro": MAX, "val/f1_macro": MAX, "val/map": MAX},
    RegressionTask: {"val/loss": MIN, "val/mae": MIN, "val/rmse": MIN, "val/pearson": MAX, "val/spearman": MAX},
    TokenClassificationTask: {
        "val/loss": MIN, "val/precision": MAX, "val/recall": MAX, "val/f1": MAX, "val/acc": MAX,
    },
    SFTTask: {"val/loss": MIN, "val/perplexity": MIN},
    PreferenceTask: {"val/loss": MIN, "val/rewards/accuracy": MAX, "val/rewards/margin": MAX},
    Seq2SeqTask: {"val/loss": MIN, "val/rouge1": MAX, "val/rouge2": MAX, "val/rougeL": MAX},
}  # fmt: skip


@pytest.mark.parametrize("task", DIRECTIONS, ids=lambda task: task.__name__)
def test_every_metric_a_task_logs_each_epoch_has_its_direction(task):
    assert {metric: metric_mode(task, metric) for metric in task.epoch_metrics} == DIRECTIONS[task]
    assert metric_mode(task, task.monitor.metric) == task.monitor.mode


def early_stopping_recipe(tiny_bert_dir, text_csv, tmp_path, **init_args):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"]["callbacks"] = [{"class_path": "EarlyStopping", "init_args": init_args}]
    return write(recipe, tmp_path / "recipe.yaml")


@pytest.mark.slow
def test_a_run_stops_once_its_metric_stops_improving(tiny_bert_dir, text_csv, tmp_path):
    # Accuracy cannot rise by more than 1: the first epoch sets the best, the second fails to beat it.
    recipe = early_stopping_recipe(
        tiny_bert_dir, text_csv, tmp_path, monitor="val/acc", patience=1, min_delta=1.0
    )
    assert main([str(recipe)]) == 0
    run = tmp_path / "runs" / "recipe" / "version_0"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics.dropna(subset=["val/acc"])["epoch"].tolist() == [0, 1]  # of max_epochs 5
    assert (run / "export").is_dir() and "test/acc" in metrics.columns  # a stopped run ends as any other
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["callbacks"]
    (early,) = [c["init_args"] for c in saved if c["class_path"].endswith("EarlyStopping")]
    assert early["mode"] == "max"  # from the metric: the recipe gave none, Lightning's default is min


def test_a_metric_the_task_does_not_log_is_one_line_naming_the_key(tiny_bert_dir, text_csv, tmp_path, capsys):
    recipe = early_stopping_recipe(tiny_bert_dir, text_csv, tmp_path, monitor="val/accuracy")
    assert main([str(recipe)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "finetune: error: trainer.callbacks.EarlyStopping.monitor: ClassificationTask logs no 'val/accuracy' "
        "each epoch; choose one of: val/loss, val/acc, val/f1"
    )
