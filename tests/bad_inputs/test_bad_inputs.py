"""Every case of cases.yaml through the CLI: the exit status, exactly one ``finetune: error: KEY: ...`` line
naming the case's key, and no traceback."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401  (binds Lightning's log handler to the real stderr, before capsys swaps it)
import pytest
import torch
import yaml

from finetune.cli import main
from tests.helpers.recipes import image_recipe, text_recipe, write

CASES = yaml.safe_load((Path(__file__).with_name("cases.yaml")).read_text())


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "class_path" not in value:
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="module")
def trained_run(tiny_bert_dir, text_csv, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs-run")
    recipe = text_recipe(tiny_bert_dir, text_csv, root / "runs")
    recipe["trainer"]["max_epochs"] = 1
    assert main([str(write(recipe, root / "trained.yaml"))]) == 0
    return root / "runs" / "trained" / "version_0"


@pytest.fixture(scope="module")
def run_with_cut_checkpoint(trained_run, tmp_path_factory) -> Path:
    copy_of_run = tmp_path_factory.mktemp("cut") / "version_0"
    shutil.copytree(trained_run, copy_of_run)
    for checkpoint in (copy_of_run / "checkpoints").glob("*.ckpt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    return copy_of_run


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_gets_one_line_naming_its_key(
    case, tiny_bert_dir, text_csv, image_folder, tiny_timm_checkpoint, tmp_path, capsys, request, monkeypatch
):
    if case.get("needs_no_gpu") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    places = {"tmp": str(tmp_path)}
    for name in ("run", "run_with_cut_checkpoint"):
        if any(f"{{{name}}}" in str(arg) for arg in case.get("args", [])):
            fixture = "trained_run" if name == "run" else name
            places[name] = str(request.getfixturevalue(fixture))
    images = tmp_path / "images"
    if case.get("base") == "image":
        shutil.copytree(image_folder, images)
    for name, text in case.get("files", {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    recipe = tmp_path / "recipe.yaml"
    if "recipe_bytes" in case:
        recipe.write_bytes(bytes.fromhex(case["recipe_bytes"]))
    elif "recipe_text" in case:
        recipe.write_text(case["recipe_text"])
    else:
        if case.get("base") == "image":
            base = image_recipe(tiny_timm_checkpoint, images, tmp_path / "runs")
        else:
            base = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
        write(merge(base, case.get("patch", {})), recipe)
    args = [str(arg).format(**places) for arg in case.get("args", [])]
    command = case.get("command", "fit")
    argv = [command, *args] if command == "export" else [command, str(recipe), *args]
    if command == "fit":
        argv = [str(recipe), *args]
    assert main(argv) == case.get("exit", 2)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"finetune: error: {case['key']}: "), lines[0]
    assert case.get("says", "") in lines[0], lines[0]
