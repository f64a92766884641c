"""``python -m finetune sweep``: Optuna trials as run folders, a summary, a study that resumes, one-line errors
for a bad space file, and median pruning that ends a run cleanly."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml

from finetune.cli import main
from tests.helpers.recipes import text_recipe, write

SPACE = {
    "optimizer.lr": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "optimizer.weight_decay": {"type": "categorical", "choices": [0.0, 0.1]},
}


def sweep_files(tiny_bert_dir, text_csv, tmp_path, space=SPACE):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs", limit=40)  # 20 training rows
    recipe["trainer"]["max_epochs"] = 1
    recipe["data"]["init_args"]["batch_size"] = 8
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    return str(write(recipe, tmp_path / "tiny.yaml")), str(space_path)


def summary(folder):
    with (folder / "summary.csv").open() as file:
        return list(csv.DictReader(file))


def test_sweep_runs_trials_as_runs_writes_a_summary_and_resumes(tiny_bert_dir, text_csv, tmp_path, capsys):
    recipe, space = sweep_files(tiny_bert_dir, text_csv, tmp_path)
    assert main(["sweep", recipe, "--space", space, "--trials", "3"]) == 0
    folder = tmp_path / "runs" / "tiny" / "sweep" / "space"  # the study is named after the space file
    rows = summary(folder)
    assert [row["trial"] for row in rows] == ["0", "1", "2"]
    assert {row["state"] for row in rows} == {"complete"}
    runs = sorted((tmp_path / "runs" / "tiny").glob("version_*"))
    assert len(runs) == 3
    for row in rows:
        run = tmp_path / "runs" / "tiny" / f"version_{row['trial']}"
        assert row["run folder"] == str(run)
        # The trial's values reached its run, and its objective is the run's best val/acc.
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert f"{config['optimizer']['lr']:.4g}" == row["optimizer.lr"]
        assert f"{config['optimizer']['weight_decay']:.4g}" == row["optimizer.weight_decay"]
        with (run / "metrics.csv").open() as file:
            accuracies = [float(r["val/acc"]) for r in csv.DictReader(file) if r.get("val/acc")]
        assert f"{max(accuracies):.4g}" == row["val/acc"]
        assert (run / "export").is_dir()
    assert (folder / "summary.md").read_text().startswith("| trial | state | val/acc |")
    assert (folder / "importance.png").read_bytes().startswith(b"\x89PNG")
    out = capsys.readouterr().out
    assert "Best: trial" in out and "--optimizer.lr=" in out

    # A rerun resumes the study: the three trials are kept, one more runs to reach 4.
    assert main(["sweep", recipe, "--space", space, "--trials", "4"]) == 0
    study = optuna.load_study(study_name="space", storage=f"sqlite:///{folder / 'study.db'}")
    assert [trial.number for trial in study.trials] == [0, 1, 2, 3]
    assert [row["optimizer.lr"] for row in summary(folder)][:3] == [row["optimizer.lr"] for row in rows]
    assert len(list((tmp_path / "runs" / "tiny").glob("version_*"))) == 4
    assert main(["sweep", recipe, "--space", space, "--trials", "4"]) == 0  # nothing missing: no run
    assert len(list((tmp_path / "runs" / "tiny").glob("version_*"))) == 4
    assert "(0 run now, 4 before)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("space", "key", "message"),
    [
        ({"optimizer.lr": {"type": "float", "low": 0, "high": 1e-3, "log": True}}, "optimizer.lr", "low > 0"),
        ({"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-4}}, "optimizer.lr", "below high"),
        ({"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, "lr", "not a recipe key"),
        (
            {"data.init_args.batch_size": {"type": "int", "low": 8, "high": 32, "lg": True}},
            "data.init_args.batch_size",
            "not lg",
        ),
        (
            {"model.init_args.strategy": {"type": "categorical", "choices": [{"name": "lora"}]}},
            "model.init_args.strategy",
            "choices must be",
        ),
        ({"optimizer.name": {"type": "choice", "choices": ["adamw"]}}, "optimizer.name", "type 'choice'"),
        ([1, 2], "--space", "must map recipe keys"),
    ],
)
def test_bad_space_file_is_one_line_naming_the_key(
    space, key, message, tiny_bert_dir, text_csv, tmp_path, capsys
):
    recipe, space_path = sweep_files(tiny_bert_dir, text_csv, tmp_path, space)
    assert main(["sweep", recipe, "--space", space_path, "--trials", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"finetune: error: {key}: ") and message in line
    assert not (tmp_path / "runs").exists()


def test_a_key_the_recipe_refuses_stops_the_sweep_with_one_line(tiny_bert_dir, text_csv, tmp_path, capsys):
    space = {"optimizer.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}
    recipe, space_path = sweep_files(tiny_bert_dir, text_csv, tmp_path, space)
    assert main(["sweep", recipe, "--space", space_path, "--trials", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("finetune: error: optimizer.lrr: ")
    assert not list((tmp_path / "runs" / "tiny").glob("version_*"))
    assert main(["sweep", recipe, "--space", space_path, "--trials", "2", "--direction", "up"]) == 2
    assert capsys.readouterr().err.strip().endswith("'up' is not one of auto, maximize, minimize")


def test_trial_report_prunes_below_the_median_and_stops_the_run_cleanly():
    from finetune.tuning.study import TrialReport

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    good.report(0.9, step=0)
    study.tell(good, 0.9)

    def validate(report, value):
        trainer = SimpleNamespace(
            sanity_checking=False, should_stop=False, callback_metrics={"val/acc": torch.tensor(value)}
        )
        report.on_validation_end(trainer, None)
        return trainer.should_stop

    kept = TrialReport(study.ask(), "val/acc")
    assert not validate(kept, 0.95)  # above the median: goes on
    assert not validate(kept, 0.97) and kept.result() == pytest.approx(0.97)  # the best of its validations
    pruned = TrialReport(study.ask(), "val/acc")
    assert validate(pruned, 0.2)  # below: the run is asked to stop after this epoch
    with pytest.raises(optuna.TrialPruned):
        pruned.result()


def test_shipped_space_names_keys_of_its_recipe():
    from finetune.tuning import parse_space
    from tests.helpers.recipes import REPOSITORY

    space = yaml.safe_load((REPOSITORY / "recipes" / "sweeps" / "quickstart-space.yaml").read_text())
    recipe = yaml.safe_load((REPOSITORY / "recipes" / "quickstart.yaml").read_text())
    for dimension in parse_space(space):
        value = recipe
        for part in dimension.key.split("."):
            assert isinstance(value, dict) and part in value, dimension.key
            value = value[part]
