"""Full runs of tiny recipes through the CLI: fit (then test), validate, test, predict, export, resume, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (binds Lightning's log handler to the real stderr, before capsys swaps it)
import pandas as pd
import pytest
import torch
import yaml

from finetune import ClassificationTask
from finetune.cli import main
from tests.helpers.recipes import image_recipe, text_recipe, write

pytestmark = pytest.mark.slow


def run_dir(root: Path, name: str = "recipe", version: int = 0) -> Path:
    return root / name / f"version_{version}"


@pytest.fixture(scope="module")
def text_run(tiny_bert_dir, text_csv, tmp_path_factory):
    """One fit of the tiny BERT recipe; the tests below read what it wrote."""
    root = tmp_path_factory.mktemp("text-run")
    recipe = write(text_recipe(tiny_bert_dir, text_csv, root / "runs"), root / "recipe.yaml")
    assert main([str(recipe)]) == 0
    return recipe, run_dir(root / "runs")


def test_fit_writes_a_complete_run_folder(text_run):
    _, run = text_run
    for name in (
        "config.yaml",
        "labels.json",
        "metrics.csv",
        "parameters.txt",
        "metrics_fit.txt",
        "metrics_test.txt",
    ):
        assert (run / name).is_file(), name
    assert json.loads((run / "labels.json").read_text()) == ["negative", "positive"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["num_sanity_val_steps"] == 1  # our default, not Lightning's 2
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"train/loss", "val/acc", "val/f1", "test/acc", "test/f1"} <= set(metrics.columns)
    assert "model.classifier" in (run / "parameters.txt").read_text()


def test_the_tiny_model_learns_the_keyword_task(text_run):
    _, run = text_run
    test_accuracy = pd.read_csv(run / "metrics.csv")["test/acc"].dropna().iloc[-1]
    assert test_accuracy >= 0.9


def test_export_reloads_with_plain_transformers_and_gives_the_same_logits(text_run, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, run = text_run
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    task = ClassificationTask.load_from_checkpoint(best, weights_only=True).eval()
    exported = AutoModelForSequenceClassification.from_pretrained(run / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "export")
    batch = dict(tokenizer(["good movie", "awful food very"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert torch.allclose(task(batch), exported(**batch).logits, atol=1e-6)
    assert exported.config.id2label == {0: "negative", 1: "positive"}


def test_validate_test_and_predict_from_a_checkpoint(text_run, capsys):
    recipe, run = text_run
    best = str(next((run / "checkpoints").glob("best-*.ckpt")))
    for command in ("validate", "test", "predict"):
        assert main([command, "--config", str(recipe), "--ckpt_path", best]) == 0, command
    predict_run = sorted(run.parent.iterdir())[-1]
    predictions = pd.read_csv(predict_run / "predictions.csv")
    assert len(predictions) == 20  # the test split, which predict uses when no predict file is given
    assert set(predictions["prediction"]) <= {"negative", "positive"}
    assert ((predictions["prediction"] == predictions["label"]).mean()) >= 0.9
    probabilities = predictions[["p_negative", "p_positive"]].sum(axis=1)
    assert probabilities.sub(1).abs().max() < 1e-5


def test_timm_image_run_exports_a_model_that_plain_timm_loads(tiny_timm_checkpoint, image_folder, tmp_path):
    import timm

    recipe = write(
        image_recipe(tiny_timm_checkpoint, image_folder, tmp_path / "runs"), tmp_path / "recipe.yaml"
    )
    assert main([str(recipe)]) == 0
    run = run_dir(tmp_path / "runs")
    exported = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    assert exported.pretrained_cfg.get("label_names") == ["blue", "red"]
    task = ClassificationTask.load_from_checkpoint(
        next((run / "checkpoints").glob("best-*.ckpt")), weights_only=True
    )
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(task.eval()({"pixel_values": images}), exported(images), atol=1e-6)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_bert_dir, text_csv, tmp_path):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"]["max_epochs"] = 3
    straight = write(recipe, tmp_path / "straight.yaml")
    assert main([str(straight)]) == 0

    recipe["trainer"]["max_epochs"] = 1
    interrupted = write(recipe, tmp_path / "interrupted.yaml")
    assert main([str(interrupted)]) == 0
    last = run_dir(tmp_path / "runs", "interrupted") / "checkpoints" / "last.ckpt"
    assert main([str(interrupted), "--trainer.max_epochs=3", f"--ckpt_path={last}"]) == 0

    expected = final_weights(run_dir(tmp_path / "runs", "straight"))
    resumed = final_weights(run_dir(tmp_path / "runs", "interrupted", 1))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_ddp_on_two_cpu_processes(tiny_bert_dir, text_csv, tmp_path):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"].update({"strategy": "ddp", "devices": 2, "max_epochs": 1})
    recipe["model"]["init_args"]["strategy"] = "freeze"
    path = write(recipe, tmp_path / "ddp.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "finetune", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir(tmp_path / "runs", "ddp")
    assert (run / "export" / "model.safetensors").is_file()
    assert "test/acc" in pd.read_csv(run / "metrics.csv").columns

    # Predict 7 unlabelled rows on 2 processes: the sampler pads to 8; the file must hold each row once.
    rows = pd.DataFrame(
        {"text": ["good movie", "bad day", "great food", "awful", "fine day", "poor", "okay"]}
    )
    rows.to_csv(tmp_path / "unlabelled.csv", index=False)
    predict = [
        sys.executable, "-m", "finetune", "predict", "--config", str(path),
        f"--data.init_args.predict={tmp_path / 'unlabelled.csv'}",
        f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
    ]  # fmt: skip
    result = subprocess.run(predict, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = pd.read_csv(run_dir(tmp_path / "runs", "ddp", 1) / "predictions.csv")
    assert predictions["text"].tolist() == rows["text"].tolist()
    assert set(predictions["prediction"]) <= {"negative", "positive"}
