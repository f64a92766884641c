"""RegressionTask: the losses by hand, metrics against scipy/numpy in the targets' units, the standardisation
round trip (predictions and exports, plain transformers / timm / peft, in the targets' units), learning a
linear target, every strategy, distillation, and the errors of keys that do not fit the task."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef

from finetune import ClassificationTask, Distillation, runs
from finetune.callbacks import PredictionWriter
from finetune.data import ImageClassificationData, TextClassificationData
from finetune.errors import RecipeError
from finetune.tasks.regression import RegressionTask, TargetMean
from tests.helpers.targets import (
    STRATEGIES,
    assert_one_step_trains_exactly,
    run_folder,
    text_batch,
    trainer,
    write_reviews,
)

CLASS_PATH = "finetune.tasks.regression.RegressionTask"


def score_data(path, backbone, **keys):
    settings = {"target_columns": ["score"], "val_fraction": 0.25, "batch_size": 8}
    return TextClassificationData(train=str(path), backbone=str(backbone), **(settings | keys))


def standardised_batch(tiny_bert_dir):
    return text_batch(tiny_bert_dir, torch.tensor([[0.5, -1.0], [1.5, 0.0], [-2.0, 1.0]]))


# --- losses and metrics: by hand ------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_the_losses_are_their_formulas_by_hand(tiny_bert_dir, loss):
    task = RegressionTask(
        str(tiny_bert_dir),
        labels=["a", "b"],
        loss=loss,
        huber_delta=0.3,
        target_mean=[1, 2],
        target_std=[2, 4],
    )
    task.configure_model()
    task.eval()
    batch = standardised_batch(tiny_bert_dir)
    value = task.training_step(batch, 0)
    with torch.no_grad():
        error = (task(batch) - batch["labels"]).abs()
    if loss == "mse":
        by_hand = (error**2).mean()
    else:
        by_hand = torch.where(error < 0.3, 0.5 * error**2, 0.3 * (error - 0.5 * 0.3)).mean()
    assert torch.allclose(value, by_hand, atol=1e-6)
    assert task.model.config.problem_type == "regression"


def test_metrics_equal_scipy_and_numpy_per_target_then_averaged():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(40, 2)) * [3.0, 0.5] + [10.0, -1.0]
    preds = target + rng.normal(size=(40, 2)) * [1.0, 0.4]
    preds[:5, 1] = preds[5, 1]  # ties, ranked as scipy ranks them (average ranks)
    expected = {
        "mae": np.abs(preds - target).mean(0).mean(),
        "rmse": np.sqrt(((preds - target) ** 2).mean(0)).mean(),
        "pearson": np.mean([stats.pearsonr(preds[:, i], target[:, i])[0] for i in range(2)]),
        "spearman": np.mean([stats.spearmanr(preds[:, i], target[:, i])[0] for i in range(2)]),
    }
    metrics = {
        "mae": TargetMean(MeanAbsoluteError(num_outputs=2)),
        "rmse": TargetMean(MeanSquaredError(squared=False, num_outputs=2)),
        "pearson": TargetMean(PearsonCorrCoef(num_outputs=2)),
        "spearman": TargetMean(SpearmanCorrCoef(num_outputs=2)),
    }
    p, t = torch.tensor(preds, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    for name, metric in metrics.items():
        metric.update(p[:25], t[:25])  # two batches accumulate into one epoch value
        metric.update(p[25:], t[25:])
        assert metric.compute().item() == pytest.approx(expected[name], rel=1e-4), name
    # The task feeds its metrics in the targets' units: standardised outputs and targets are mapped back.
    vit = {"name": "timm:test_vit", "pretrained": False}
    task = RegressionTask(vit, labels=["a", "b"], target_mean=[10.0, -1.0], target_std=[3.0, 0.5])
    task.configure_model()
    mean, std = torch.tensor([10.0, -1.0]), torch.tensor([3.0, 0.5])
    task.update_metrics(task.val_metrics, (p - mean) / std, {"labels": (t - mean) / std})
    computed = task.val_metrics.compute()
    for name, value in expected.items():
        assert computed[f"val/{name}"].item() == pytest.approx(value, rel=1e-4), name
    single = TargetMean(PearsonCorrCoef(num_outputs=1))
    single.update(p[:, :1], t[:, :1])
    assert single.compute().item() == pytest.approx(stats.pearsonr(preds[:, 0], target[:, 0])[0], rel=1e-4)


def test_the_distillation_loss_is_the_mean_squared_difference():
    student = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    teacher = torch.tensor([[1.0, 0.0], [-0.5, 2.5]])
    task = RegressionTask("timm:test_vit", labels=["a", "b"])
    expected = torch.tensor([(1.0 + 1.0) / 2, (0.25 + 0.25) / 2])
    for temperature in (1.0, 4.0):  # ignored
        assert torch.allclose(task.distillation_loss(student, teacher, temperature), expected)


# --- the standardisation round trip --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny_bert_dir, tmp_path_factory):
    """A tiny BERT fitted for 2 epochs on ``score`` (mean about 10), its data and its last checkpoint."""
    root = tmp_path_factory.mktemp("regression")
    path = write_reviews(root / "reviews.csv")
    torch.manual_seed(0)
    data = score_data(path, tiny_bert_dir)
    task = RegressionTask(str(tiny_bert_dir), optimizer={"lr": 3e-3})
    fit = trainer(root, max_epochs=2)
    fit.fit(task, data)
    metrics = dict(fit.callback_metrics)
    checkpoint = Path(fit.checkpoint_callback.best_model_path)
    return SimpleNamespace(
        task=task, data=data, root=root, table=path, checkpoint=checkpoint, metrics=metrics
    )


def test_the_model_learns_standardised_targets_kept_with_it(fitted):
    task, data = fitted.task, fitted.data
    train = np.array(data.table("train")["score"], dtype=float)
    assert task.target_mean.tolist() == pytest.approx([train.mean()])
    assert task.target_std.tolist() == pytest.approx([train.std()])
    labels = data.split_dataset("train").label_ids.take(list(range(len(train))))
    assert labels.mean() == pytest.approx(0, abs=1e-6) and labels.std() == pytest.approx(1, abs=1e-5)
    checkpoint = torch.load(fitted.checkpoint, weights_only=True)
    assert checkpoint["hyper_parameters"]["target_mean"] == pytest.approx([train.mean()])
    assert torch.equal(checkpoint["state_dict"]["target_std"], task.target_std)
    rebuilt = runs.load_checkpoint(fitted.checkpoint, RegressionTask)
    assert torch.equal(rebuilt.target_mean, task.target_mean) and rebuilt.labels == ["score"]
    assert set(fitted.metrics) >= {"val/mae", "val/rmse", "val/pearson", "val/spearman", "train/rmse"}
    assert f"score {train.mean():.4g} ± {train.std():.4g}" in task.describe_task()  # in the run plan


def test_predictions_and_the_export_are_in_the_targets_units(fitted, tiny_bert_dir, tmp_path):
    # Predicting from the checkpoint with data that has no train split: the statistics come with the model.
    predict_only = TextClassificationData(
        predict=str(fitted.table), backbone=str(tiny_bert_dir), target_columns=["score"]
    )
    predictor = trainer(tmp_path, callbacks=[PredictionWriter()])
    predictor.predict(RegressionTask(str(tiny_bert_dir)), predict_only, ckpt_path=fitted.checkpoint)
    written = pd.read_csv(runs.run_dir(predictor) / runs.PREDICTIONS)
    assert written.columns[-1] == "predicted_score" and "score" in written.columns
    task = fitted.task.eval()
    batches = predict_only.predict_dataloader()
    with torch.no_grad():
        outputs = torch.cat([task(batch) for batch in batches])
    in_units = outputs[:, 0] * task.target_std + task.target_mean
    assert np.allclose(written["predicted_score"], in_units.numpy(), atol=1e-5)
    assert abs(written["predicted_score"].mean() - 10) < 3  # the targets' units, not standardised ones

    before = {n: p.clone() for n, p in task.state_dict().items()}
    export = task.export(tmp_path / "export")
    assert all(torch.equal(before[n], p) for n, p in task.state_dict().items())  # unfolded again, exactly
    record = json.loads((export / "targets.json").read_text())
    assert record == {"names": ["score"], "mean": task.target_mean.tolist(), "std": task.target_std.tolist()}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(export), str(fitted.table)],
        capture_output=True,
        text=True,
        check=True,
    )
    plain = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["problem_type"] == "regression"
    assert np.allclose(plain["scores"], written["predicted_score"], atol=1e-4)


PLAIN_TRANSFORMERS = """
import json, sys
import pandas as pd, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
export, table = sys.argv[1:]
model = AutoModelForSequenceClassification.from_pretrained(export).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
texts = pd.read_csv(table)["text"].tolist()
with torch.no_grad():
    scores = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
assert "finetune" not in sys.modules
print(json.dumps({"scores": scores.tolist(), "problem_type": model.config.problem_type}))
"""


def test_adapter_exports_give_the_targets_units_merged_or_not(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    task = RegressionTask(
        str(tiny_bert_dir), strategy="lora", labels=["a", "b"], target_mean=[5, -2], target_std=[3, 0.5]
    )
    task.configure_model()
    batch = standardised_batch(tiny_bert_dir)
    torch.nn.init.normal_(task.model.classifier.weight)  # a head that is not the random init
    with torch.no_grad():
        for name, parameter in task.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # adapters that change the outputs
    task.eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    with torch.no_grad():
        expected = task.in_units(task(batch))
        merged = AutoModelForSequenceClassification.from_pretrained(
            task.export(tmp_path / "merged", merge=True)
        )
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        adapters = PeftModel.from_pretrained(base, task.export(tmp_path / "adapters"))
        assert torch.allclose(merged.eval()(**inputs).logits, expected, atol=1e-5)
        assert torch.allclose(adapters.eval()(**inputs).logits, expected, atol=1e-5)


def test_an_image_regression_export_reloads_in_plain_timm(tmp_path, image_folder, tiny_timm_checkpoint):
    lines = ["path,redness"]
    for i in range(8):
        label = ["red", "blue"][i % 2]
        lines.append(f"{image_folder / label / f'{i}.png'},{(100 if label == 'red' else 20) + i}")
    (tmp_path / "images.csv").write_text("\n".join(lines) + "\n")
    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    data = ImageClassificationData(
        train=str(tmp_path / "images.csv"),
        backbone=backbone,
        target_columns=["redness"],
        val_fraction=0.25,
        batch_size=4,
    )
    task = RegressionTask(backbone, strategy="freeze", optimizer={"lr": 0.05})
    trainer(tmp_path, max_epochs=2).fit(task, data)
    task.eval()
    pixels = next(iter(data.val_dataloader()))["pixel_values"]
    with torch.no_grad():
        expected = task.in_units(task({"pixel_values": pixels}))
    torch.save({"pixels": pixels, "expected": expected}, tmp_path / "io.pt")
    export = task.export(tmp_path / "export")
    subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(export), str(tmp_path / "io.pt")], check=True)


PLAIN_TIMM = """
import sys
import timm, torch
export, io = sys.argv[1:]
model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
saved = torch.load(io)
with torch.no_grad():
    outputs = model(saved["pixels"])
assert "finetune" not in sys.modules
assert torch.allclose(outputs, saved["expected"], atol=1e-4), (outputs, saved["expected"])
"""


@pytest.mark.slow
def test_a_tiny_bert_learns_a_linear_target(tmp_path):
    """score = 2·#good - #bad + 10 over 6 words: R² above 0.9 on held-out rows (about 30-60 s on 2 cores)."""
    from tests.helpers.models import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert", dropout=0.0)
    path = write_reviews(tmp_path / "reviews.csv", rows=240)
    torch.manual_seed(0)
    data = score_data(path, bert, batch_size=16)
    task = RegressionTask(str(bert), optimizer={"lr": 3e-3})
    fit = trainer(tmp_path, max_epochs=8, enable_checkpointing=False)
    fit.fit(task, data)
    predicted = torch.cat([out["values"] for out in fit.predict(task, dataloaders=data.val_dataloader())])[
        :, 0
    ]
    truth = np.array(data.table("val")["score"], dtype=float)
    r2 = 1 - ((predicted.numpy() - truth) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()
    assert r2 > 0.9


# --- strategies, distillation ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_trains_exactly_its_parameters(tiny_bert_dir, strategy):
    task = RegressionTask(
        str(tiny_bert_dir),
        strategy=STRATEGIES[strategy][0],
        labels=["a", "b"],
        target_mean=[0, 0],
        target_std=[1, 1],
    )
    assert_one_step_trains_exactly(task, standardised_batch(tiny_bert_dir), strategy)


def test_distillation_from_a_run_of_the_same_task(tiny_bert_dir, tmp_path):
    path = write_reviews(tmp_path / "reviews.csv", rows=32)
    teacher = run_folder(
        RegressionTask(str(tiny_bert_dir)), score_data(path, tiny_bert_dir), tmp_path / "t", CLASS_PATH
    )
    student = RegressionTask(str(tiny_bert_dir))
    distil = trainer(tmp_path / "s", max_steps=2, callbacks=[Distillation(teacher=str(teacher), alpha=0.5)])
    distil.fit(student, score_data(path, tiny_bert_dir))
    logged = distil.callback_metrics
    assert math.isfinite(logged["train/kd_loss"]) and logged["train/kd_loss"] > 0
    # Its export outputs the targets' units, not the standardised ones the student learns: refused.
    exported = student.export(tmp_path / "export")
    with pytest.raises(
        RecipeError, match=r"^trainer\.callbacks\.Distillation\.teacher: .* is a regression export"
    ):
        trainer(tmp_path / "e", max_steps=1, callbacks=[Distillation(teacher=str(exported))]).fit(
            RegressionTask(str(tiny_bert_dir)), score_data(path, tiny_bert_dir)
        )


# --- errors ---------------------------------------------------------------------------------------------


def test_keys_that_do_not_fit_the_task_are_refused(tiny_bert_dir, text_csv, tmp_path):
    bert = str(tiny_bert_dir)
    with pytest.raises(RecipeError, match=r"^model\.label_smoothing: smooths one-class targets"):
        RegressionTask(bert, label_smoothing=0.1)
    with pytest.raises(RecipeError, match=r"^model\.loss: is 'mae'; choose mse or huber"):
        RegressionTask(bert, loss="mae")
    with pytest.raises(RecipeError, match=r"^model\.huber_delta: must be above 0"):
        RegressionTask(bert, huber_delta=0)
    with pytest.raises(RecipeError, match=r"^model\.target_std: target_mean and target_std come together"):
        RegressionTask(bert, target_mean=[1.0])
    with pytest.raises(RecipeError, match=r"^model\.target_std: needs one standard deviation above 0"):
        RegressionTask(bert, target_mean=[1.0], target_std=[0.0])
    path = write_reviews(tmp_path / "r.csv", rows=8)
    with pytest.raises(RecipeError, match=r"^model\.target_mean: the model's target statistics .* differ"):
        trainer(tmp_path, max_steps=1).fit(
            RegressionTask(bert, target_mean=[0.0], target_std=[1.0]), score_data(path, bert)
        )
    class_data = TextClassificationData(train=str(text_csv), backbone=bert)
    with pytest.raises(
        RecipeError, match=r"^data\.target_columns: RegressionTask needs float target columns"
    ):
        trainer(tmp_path, max_steps=1).fit(RegressionTask(bert), class_data)
    with pytest.raises(
        RecipeError, match=r"^data\.target_columns: makes regression data, which ClassificationTask"
    ):
        trainer(tmp_path, max_steps=1).fit(ClassificationTask(bert), score_data(path, bert))
    no_statistics = TextClassificationData(predict=str(path), backbone=bert, target_columns=["score"])
    with pytest.raises(RecipeError, match=r"^data\.train: the model has no target statistics"):
        trainer(tmp_path).predict(RegressionTask(bert), no_statistics)
