"""The command line: fast help, one-line errors naming the recipe key, and full runs of tiny recipes."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch  # noqa: F401  (binds Lightning's log handler to the real stderr, before capsys swaps it)
import pytest

from finetune.cli import main
from tests.helpers.recipes import text_recipe, write


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def one_line_error(err: str, key: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"finetune: error: {key}: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_help_does_not_import_lightning_or_torch():
    code = (
        "import sys; from finetune.cli import main; rc = main(['--help']); "
        "heavy = [m for m in ('torch', 'lightning', 'transformers', 'timm') if m in sys.modules]; "
        "assert rc == 0 and not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m finetune RECIPE.yaml" in result.stdout


def test_module_entry_point_exits_with_status_2_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "finetune", str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    one_line_error(result.stderr, "--config")


@pytest.fixture
def recipe(tiny_bert_dir, text_csv, tmp_path):
    def make(**changes) -> str:
        recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = recipe
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        return str(write(recipe, tmp_path / "recipe.yaml"))

    return make


def test_unknown_key(recipe, capsys):
    code, err = run([recipe(model__init_args__stratgy="full")], capsys)
    assert code == 2
    line = one_line_error(err, "model.stratgy")
    assert "valid: backbone, strategy" in line


def test_unknown_key_on_the_command_line(recipe, capsys):
    code, err = run(["fit", "--config", recipe(), "--trainer.max_epochz=3"], capsys)
    assert code == 2
    one_line_error(err, "trainer.max_epochz")


def test_wrong_type(recipe, capsys):
    code, err = run([recipe(trainer__max_epochs="two")], capsys)
    assert code == 2
    assert "expected int, got 'two'" in one_line_error(err, "trainer.max_epochs")


def test_unknown_command(capsys):
    code, err = run(["trian"], capsys)
    assert code == 2
    one_line_error(err, "command")


def test_missing_data_file(recipe, tmp_path, capsys):
    code, err = run([recipe(data__init_args__train=str(tmp_path / "nope.csv"))], capsys)
    assert code == 2
    assert "nope.csv does not exist" in one_line_error(err, "data.train")


def test_missing_column(recipe, capsys):
    code, err = run([recipe(data__init_args__text_column="body")], capsys)
    assert code == 2
    one_line_error(err, "data.text_column")


def test_empty_dataset(recipe, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    code, err = run([recipe(data__init_args__train=str(empty))], capsys)
    assert code == 2
    assert "no rows" in one_line_error(err, "data.train")


def test_unknown_timm_backbone(recipe, capsys):
    code, err = run([recipe(model__init_args__backbone="timm:resnet18x")], capsys)
    assert code == 2
    assert "did you mean resnet18" in one_line_error(err, "model.backbone")


def test_backbone_without_prefix_or_folder(recipe, capsys):
    code, err = run([recipe(model__init_args__backbone="no/such/model")], capsys)
    assert code == 2
    assert "timm:NAME" in one_line_error(err, "model.backbone")


def test_label_mismatch(recipe, capsys):
    code, err = run([recipe(model__init_args__labels=["negative", "neutral", "positive"])], capsys)
    assert code == 2
    one_line_error(err, "model.labels")


def test_unseen_validation_label(recipe, tiny_bert_dir, text_csv, tmp_path, capsys):
    val = tmp_path / "val.csv"
    val.write_text("text,label\ngood day,neutral\n")
    code, err = run([recipe(data__init_args__val=str(val))], capsys)
    assert code == 2
    assert "neutral" in one_line_error(err, "data.val")


def test_torch_class_path_in_an_optimizer_section(recipe, capsys):
    code, err = run(
        [recipe(optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}})], capsys
    )
    assert code == 2
    assert "not class_path 'torch.optim.AdamW'" in one_line_error(err, "optimizer")
