"""MultiLabelClassificationTask: the BCE loss, thresholds tuned on validation (checked by hand), kept in
checkpoints, used by predict and by the export (reloaded with plain transformers), every strategy, the binary
KD loss and distillation from a run of the same task, and the errors of keys that do not fit the task."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import multilabel_f1_score

from finetune import ClassificationTask, Distillation, runs
from finetune.callbacks import PredictionWriter
from finetune.data import ImageClassificationData, TextClassificationData
from finetune.errors import RecipeError
from finetune.tasks.multilabel import MultiLabelClassificationTask, best_thresholds, binary_kd_per_item
from tests.helpers.targets import (
    STRATEGIES,
    assert_one_step_trains_exactly,
    run_folder,
    text_batch,
    trainer,
    write_reviews,
)

LABELS = ["neg", "pos"]
CLASS_PATH = "finetune.tasks.multilabel.MultiLabelClassificationTask"


def reviews_data(path, backbone, **keys):
    settings = {"label_column": "tags", "label_separator": "|", "val_fraction": 0.25, "batch_size": 8}
    return TextClassificationData(train=str(path), backbone=str(backbone), **(settings | keys))


def f1(scores: list[float], truth: list[int], threshold: float) -> float:
    called = [s >= threshold for s in scores]
    tp = sum(c and t for c, t in zip(called, truth))
    return 2 * tp / (sum(called) + sum(truth))


# --- loss, thresholds, distillation loss: by hand ------------------------------------------------------


def test_the_loss_is_binary_cross_entropy_by_hand(tiny_bert_dir):
    task = MultiLabelClassificationTask(str(tiny_bert_dir), labels=["a", "b", "c"])
    task.configure_model()
    task.eval()  # no dropout: the loss and the logits below come from the same forward
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    batch = text_batch(tiny_bert_dir, targets)
    loss = task.training_step(batch, 0)
    with torch.no_grad():
        x = task(batch)
    p = 1 / (1 + torch.exp(-x))
    by_hand = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert task.model.config.problem_type == "multi_label_classification"


def test_tuned_thresholds_maximise_each_labels_f1_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.2, 0.6, 0.3],
            [0.8, 0.6, 0.6, 0.2],
            [0.4, 0.7, 0.3, 0.1],
            [0.3, 0.1, 0.3, 0.9],
            [0.75, 0.65, 0.1, 0.4],
        ]
    )
    truth = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 0]])
    chosen = best_thresholds(scores, truth, torch.full((4,), 0.5))
    # Label 0, ranked 0.9+ 0.8+ 0.75- 0.4- 0.3+: calling the top two gives F1 2·2/(2+3) = 0.8, the best;
    # the threshold is midway to the next score. Label 1: the top three are exactly the positives.
    # Label 2 ties 0.6 (+,-) and 0.3 (+,+): calling both pairs gives 2·3/(4+3); cuts only between ties.
    # Label 3 has no positive row: it keeps its threshold.
    assert torch.allclose(chosen, torch.tensor([0.775, 0.4, 0.2, 0.5]))
    for label in range(3):
        column, positives = scores[:, label].tolist(), truth[:, label].tolist()
        best = f1(column, positives, chosen[label].item())
        grid = [i / 1000 for i in range(1, 1001)]
        assert best == pytest.approx(max(f1(column, positives, t) for t in grid))
    assert f1(scores[:, 0].tolist(), truth[:, 0].tolist(), 0.775) == pytest.approx(0.8)


def test_the_distillation_loss_is_the_binary_kl_by_hand():
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [-0.5, 2.5, 0.1]])
    t = 2.0
    p, q = torch.sigmoid(teacher / t), torch.sigmoid(student / t)
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    expected = t**2 * kl.mean(-1)
    assert torch.allclose(binary_kd_per_item(student, teacher, t), expected, atol=1e-6)
    assert torch.allclose(binary_kd_per_item(teacher, teacher, t), torch.zeros(2), atol=1e-6)
    task = MultiLabelClassificationTask("timm:test_vit", labels=LABELS)
    assert torch.allclose(task.distillation_loss(student, teacher, t), expected, atol=1e-6)


# --- a fitted run: tuning, checkpoints, predict, export --------------------------------------------------


@pytest.fixture(scope="module")
def tuned(tiny_bert_dir, tmp_path_factory):
    """A tiny BERT fitted for 3 epochs with tuned thresholds, its data and its last checkpoint."""
    root = tmp_path_factory.mktemp("multilabel")
    path = write_reviews(root / "reviews.csv")
    torch.manual_seed(0)
    data = reviews_data(path, tiny_bert_dir, predict=str(path))
    task = MultiLabelClassificationTask(str(tiny_bert_dir), tune_thresholds=True, optimizer={"lr": 3e-3})
    fitted = trainer(root, max_epochs=3)
    fitted.fit(task, data)
    metrics = dict(fitted.callback_metrics)  # predicting below resets them
    val = data.split_dataset("val")
    targets = val.collate(val.__getitems__(list(range(len(val)))))["labels"]
    probabilities = torch.cat(
        [out["values"] for out in fitted.predict(task, dataloaders=data.val_dataloader())]
    )
    checkpoint = Path(fitted.checkpoint_callback.best_model_path)
    return SimpleNamespace(
        task=task,
        data=data,
        metrics=metrics,
        root=root,
        table=path,
        checkpoint=checkpoint,
        val_probabilities=probabilities,
        val_targets=targets,
    )


def test_thresholds_are_tuned_on_validation_and_val_f1_is_measured_at_them(tuned):
    task = tuned.task
    expected = best_thresholds(tuned.val_probabilities, tuned.val_targets, torch.full((2,), 0.5))
    assert torch.allclose(task.label_thresholds, expected)
    assert task.thresholds != [0.5, 0.5]
    assert f"thresholds: {task.thresholds[0]:.3g}, {task.thresholds[1]:.3g}; tuned" in task.describe_task()
    decisions = (tuned.val_probabilities >= task.label_thresholds).long()
    for average in ("macro", "micro"):
        f1_score = multilabel_f1_score(decisions, tuned.val_targets.long(), num_labels=2, average=average)
        assert torch.allclose(tuned.metrics[f"val/f1_{average}"], f1_score)
    assert set(tuned.metrics) >= {"val/map", "train/f1_macro", "val/loss"}


def test_thresholds_are_kept_in_the_checkpoint(tuned):
    checkpoint = torch.load(tuned.checkpoint, weights_only=True)
    assert checkpoint["hyper_parameters"]["thresholds"] == pytest.approx(tuned.task.thresholds)
    assert torch.equal(checkpoint["state_dict"]["label_thresholds"], tuned.task.label_thresholds)
    rebuilt = runs.load_checkpoint(tuned.checkpoint, MultiLabelClassificationTask)
    assert rebuilt.thresholds == pytest.approx(tuned.task.thresholds)
    assert rebuilt.separator == "|" and rebuilt.labels == LABELS


def test_predict_and_the_export_give_the_same_label_sets(tuned, tiny_bert_dir, tmp_path):
    # A task from the recipe alone, predicting with the checkpoint: the tuned thresholds come with it.
    fresh = MultiLabelClassificationTask(str(tiny_bert_dir))
    predictor = trainer(tmp_path, callbacks=[PredictionWriter()])
    predictor.predict(fresh, tuned.data, ckpt_path=tuned.checkpoint)
    written = pd.read_csv(runs.run_dir(predictor) / runs.PREDICTIONS, keep_default_na=False)
    assert list(written.columns[-3:]) == ["prediction", "p_neg", "p_pos"]
    chosen = torch.tensor(written[["p_neg", "p_pos"]].to_numpy()) >= torch.tensor(tuned.task.thresholds)
    assert written["prediction"].tolist() == [
        "|".join(label for label, on in zip(LABELS, row) if on) for row in chosen.tolist()
    ]
    assert {"neg", "pos", "neg|pos"} & set(written["prediction"])

    export = tuned.task.export(tmp_path / "export")
    assert json.loads((export / "thresholds.json").read_text()) == pytest.approx(
        dict(zip(LABELS, tuned.task.thresholds))
    )
    assert json.loads((export / "labels.json").read_text()) == LABELS
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(export), str(tuned.table)],
        capture_output=True,
        text=True,
        check=True,
    )
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["problem_type"] == "multi_label_classification"
    assert plain["sets"] == written["prediction"].tolist()


PLAIN_TRANSFORMERS = """
import json, sys
import pandas as pd, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
export, table = sys.argv[1:]
model = AutoModelForSequenceClassification.from_pretrained(export).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
labels = json.load(open(f"{export}/labels.json"))
thresholds = json.load(open(f"{export}/thresholds.json"))
texts = pd.read_csv(table)["text"].tolist()
with torch.no_grad():
    p = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.sigmoid()
sets = ["|".join(l for i, l in enumerate(labels) if p[r, i] >= thresholds[l]) for r in range(len(texts))]
assert "finetune" not in sys.modules
print(json.dumps({"sets": sets, "problem_type": model.config.problem_type}))
"""


# --- strategies, distillation, images ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_trains_exactly_its_parameters(tiny_bert_dir, strategy):
    task = MultiLabelClassificationTask(str(tiny_bert_dir), strategy=STRATEGIES[strategy][0], labels=LABELS)
    batch = text_batch(tiny_bert_dir, torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    assert_one_step_trains_exactly(task, batch, strategy)


def test_distillation_from_a_run_of_the_same_task(tiny_bert_dir, tmp_path):
    path = write_reviews(tmp_path / "reviews.csv", rows=32)
    teacher = run_folder(
        MultiLabelClassificationTask(str(tiny_bert_dir)),
        reviews_data(path, tiny_bert_dir),
        tmp_path / "t",
        CLASS_PATH,
    )
    student = MultiLabelClassificationTask(str(tiny_bert_dir))
    distil = trainer(tmp_path / "s", max_steps=2, callbacks=[Distillation(teacher=str(teacher), alpha=0.5)])
    distil.fit(student, reviews_data(path, tiny_bert_dir))
    logged = distil.callback_metrics
    assert math.isfinite(logged["train/kd_loss"]) and logged["train/kd_loss"] > 0


def test_an_image_model_trains_on_0_1_columns(tmp_path, image_folder, tiny_timm_checkpoint):
    lines = ["path,red,blue,dark"]
    for i in range(8):
        label = ["red", "blue"][i % 2]
        lines.append(
            f"{image_folder / label / f'{i}.png'},{int(label == 'red')},{int(label == 'blue')},{i % 3 == 0:d}"
        )
    (tmp_path / "images.csv").write_text("\n".join(lines) + "\n")
    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    data = ImageClassificationData(
        train=str(tmp_path / "images.csv"),
        backbone=backbone,
        label_columns=["red", "blue", "dark"],
        val_fraction=0.25,
        batch_size=4,
    )
    task = MultiLabelClassificationTask(backbone, strategy="freeze")
    fitted = trainer(tmp_path, max_epochs=1)
    fitted.fit(task, data)
    assert task.labels == ["red", "blue", "dark"] and task.model.get_classifier().out_features == 3
    assert set(fitted.callback_metrics) >= {"val/map", "val/f1_macro"}


# --- errors ---------------------------------------------------------------------------------------------------


def test_keys_that_do_not_fit_the_task_are_refused(tiny_bert_dir, text_csv, tmp_path):
    with pytest.raises(RecipeError, match=r"^model\.label_smoothing: smooths one-class targets"):
        MultiLabelClassificationTask(str(tiny_bert_dir), label_smoothing=0.1)
    with pytest.raises(RecipeError, match=r"^model\.thresholds: are probabilities"):
        MultiLabelClassificationTask(str(tiny_bert_dir), thresholds=[0.5, 1.5])
    with pytest.raises(RecipeError, match=r"^model\.thresholds: gives 3 thresholds for 2 labels"):
        MultiLabelClassificationTask(
            str(tiny_bert_dir), labels=LABELS, thresholds=[0.5] * 3
        ).configure_model()
    class_data = TextClassificationData(train=str(text_csv), backbone=str(tiny_bert_dir))
    with pytest.raises(
        RecipeError, match=r"^data\.label_separator: MultiLabelClassificationTask needs several labels"
    ):
        trainer(tmp_path, max_steps=1).fit(MultiLabelClassificationTask(str(tiny_bert_dir)), class_data)
    multi_data = reviews_data(write_reviews(tmp_path / "r.csv", rows=8), tiny_bert_dir)
    with pytest.raises(
        RecipeError, match=r"^data\.label_separator: makes multi-label data, which ClassificationTask"
    ):
        trainer(tmp_path, max_steps=1).fit(ClassificationTask(str(tiny_bert_dir)), multi_data)
