"""The shipped distillation recipes end to end through the CLI on tiny local models (hub backbones and
teachers overridden), under DDP on 2 CPU processes, and a mismatched teacher as a one-line CLI error."""

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

from finetune.cli import main
from tests.helpers.models import export_classifier
from tests.helpers.recipes import REPOSITORY, distils, offline_overrides, shipped_recipes

RECIPES = REPOSITORY / "recipes"
DISTILLATION_RECIPES = [p for p in shipped_recipes() if distils(yaml.safe_load(p.read_text()))]
TEACHER = "--trainer.callbacks.init_args.teacher"


def common(root: Path) -> list[str]:
    return [
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
    ]


def text_args(tiny_bert_dir, bert_teacher, text_csv, root) -> list[str]:
    return [
        str(RECIPES / "distill-minilm-bert-tiny.yaml"),
        f"--model.init_args.backbone={tiny_bert_dir}",
        f"{TEACHER}={bert_teacher}",
        f"--data.init_args.train={text_csv}",
        "--data.init_args.label_column=label",
        "--data.init_args.batch_size=8",
        "--trainer.max_epochs=2",
        *common(root),
    ]


def last(run: Path, column: str) -> float:
    return pd.read_csv(run / "metrics.csv")[column].dropna().iloc[-1]


@pytest.mark.slow
def test_text_recipe_distils_and_exports_the_student_alone(tiny_bert_dir, bert_teacher, text_csv, tmp_path):
    assert main(text_args(tiny_bert_dir, bert_teacher, text_csv, tmp_path)) == 0
    run = tmp_path / "distill-minilm-bert-tiny" / "version_0"
    metrics = pd.read_csv(run / "metrics.csv")
    assert {"train/loss", "train/task_loss", "train/kd_loss", "test/acc"} <= set(metrics.columns)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(key.startswith("model.") for key in state["state_dict"])
    assert state["hyper_parameters"]["backbone"]["name"] == str(tiny_bert_dir)
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["hidden_size"] == 32  # the student, not the 48-wide teacher


@pytest.mark.slow
def test_vit_to_resnet_recipe_with_feature_projection(tiny_timm_checkpoint, image_folder, tmp_path):
    vit = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    teacher = export_classifier(vit, ["blue", "red"], tmp_path / "teacher")
    resnet = json.dumps({"name": "timm:test_resnet", "pretrained": False})
    argv = [
        str(RECIPES / "distill-vit-resnet.yaml"),
        f"--model.init_args.backbone={resnet}",
        f"{TEACHER}={teacher}",
        f"--data.init_args.train={image_folder}",
        "--data.init_args.batch_size=4",
        "--trainer.max_epochs=1",
        *common(tmp_path),
    ]
    assert main(argv) == 0
    run = tmp_path / "distill-vit-resnet" / "version_0"
    assert {"train/kd_loss", "train/feature_loss"} <= set(pd.read_csv(run / "metrics.csv").columns)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert tuple(state["loss_modules.feature.0.weight"].shape) == (64, 96)  # resnet 96 -> vit 64
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0  # the projection is skipped
    from safetensors.torch import load_file

    assert not any("feature" in key for key in load_file(tmp_path / "again" / "model.safetensors"))


@pytest.mark.slow
def test_sft_recipe_lora_student_learns_from_a_larger_teacher(tiny_llama_dir, llama_teacher, tmp_path):
    argv = [
        str(RECIPES / "distill-smollm-sft.yaml"),
        f"--model.init_args.backbone={tiny_llama_dir}",
        f"{TEACHER}={llama_teacher}",
        f"--data.init_args.train={RECIPES / 'data' / 'instructions.jsonl'}",
        "--model.init_args.samples=0",
        "--trainer.max_epochs=1",
        *common(tmp_path),
    ]
    assert main(argv) == 0
    run = tmp_path / "distill-smollm-sft" / "version_0"
    assert {"train/task_loss", "train/kd_loss", "val/loss"} <= set(pd.read_csv(run / "metrics.csv").columns)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state)  # adapters only: no teacher, no frozen base
    assert json.loads((run / "export" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_mismatched_teacher_through_the_cli_is_one_line(
    tiny_bert_dir, three_class_teacher, text_csv, tmp_path, capsys
):
    argv = text_args(tiny_bert_dir, three_class_teacher, text_csv, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        "finetune: error: trainer.callbacks.Distillation.teacher: the teacher has 3 classes"
    )
    assert sum("finetune:" in line or "Traceback" in line for line in err) == 1, err


@pytest.mark.slow
def test_distillation_under_ddp_on_two_cpu_processes(tiny_bert_dir, bert_teacher, text_csv, tmp_path):
    recipe = yaml.safe_load((RECIPES / "distill-minilm-bert-tiny.yaml").read_text())
    recipe["trainer"].update(
        {
            "strategy": "ddp",
            "devices": 2,
            "accelerator": "cpu",
            "max_epochs": 1,
            "default_root_dir": str(tmp_path),
        }
    )
    recipe["trainer"].update({"enable_progress_bar": False, "log_every_n_steps": 1})
    recipe["trainer"]["callbacks"][0]["init_args"]["teacher"] = str(bert_teacher)
    recipe["model"]["init_args"]["backbone"] = str(tiny_bert_dir)
    recipe["data"]["init_args"].update({"train": str(text_csv), "label_column": "label", "batch_size": 8})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run(
        [sys.executable, "-m", "finetune", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "ddp" / "version_0"
    assert (run / "export" / "model.safetensors").is_file()
    assert {"train/kd_loss", "test/acc"} <= set(pd.read_csv(run / "metrics.csv").columns)


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory) -> Path:
    """A random ``test_vit`` classifier over the tiny image folder's classes, as an export folder."""
    vit = {"name": "timm:test_vit", "pretrained": False}
    return export_classifier(vit, ["blue", "red"], tmp_path_factory.mktemp("vit-teacher") / "export")


@pytest.mark.slow
@pytest.mark.parametrize("path", DISTILLATION_RECIPES, ids=lambda p: p.name)
def test_distillation_recipe_parses_and_builds_with_a_teacher(
    path,
    tiny_bert_dir,
    tiny_llama_dir,
    image_folder,
    three_class_teacher,
    llama_teacher,
    image_teacher,
    monkeypatch,
):
    """Every shipped distillation recipe builds through ``plan`` (student, teacher and their checks), with
    tiny local models for the hub's and a teacher of the recipe's kind."""
    recipe = yaml.safe_load(path.read_text())
    task = recipe["model"]["class_path"]
    data = recipe["data"]["class_path"]
    teacher = (
        llama_teacher
        if task.endswith("SFTTask")
        else image_teacher
        if "Image" in data
        else three_class_teacher
    )
    tiny = {"bert": tiny_bert_dir, "llama": tiny_llama_dir, "images": image_folder}
    monkeypatch.chdir(REPOSITORY)  # recipes name their data relative to the repository
    assert main(["plan", str(path), *offline_overrides(recipe, tiny), f"{TEACHER}={teacher}"]) == 0
