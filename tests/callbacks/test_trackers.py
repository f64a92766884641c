"""Trackers from the recipe (``trainer.logger``): TensorBoard and MLflow, read back with their own readers,
hold the scalars of metrics.csv, the flattened recipe and the files config.yaml and plan.txt; the run folder
stays complete; the loggers share its version; a bad logger is one line naming ``trainer.logger``."""

from __future__ import annotations

import json
import math
import re
import struct
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from finetune.callbacks.trackers import flatten, run_loggers
from finetune.cli import main
from tests.helpers.recipes import text_recipe, write


@pytest.fixture(scope="module")
def tracked_run(tiny_bert_dir, text_csv, tmp_path_factory) -> tuple[Path, Path]:
    """One fit of the tiny BERT recipe with TensorBoard and MLflow: (the runs root, the run folder)."""
    root = tmp_path_factory.mktemp("tracked") / "runs"
    recipe = text_recipe(tiny_bert_dir, text_csv, root)
    board = {"class_path": "TensorBoardLogger", "init_args": {"save_dir": str(root)}}  # Lightning requires it
    recipe["trainer"].update({"max_epochs": 2, "logger": [board, "MLFlowLogger"]})
    assert main([str(write(recipe, root.parent / "recipe.yaml"))]) == 0
    return root, root / "recipe" / "version_0"


def csv_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Each metric of metrics.csv as its (step, value) pairs, in the order logged."""
    metrics = pd.read_csv(run / "metrics.csv")
    return {
        column: [(int(s), float(v)) for s, v in zip(metrics["step"], metrics[column]) if not math.isnan(v)]
        for column in metrics.columns
        if column != "step"
    }


@pytest.mark.slow
def test_the_run_folder_stays_complete_and_config_keeps_the_recipes_loggers(tracked_run):
    _, run = tracked_run
    for name in (
        "config.yaml",
        "metrics.csv",
        "plan.txt",
        "parameters.txt",
        "metrics_fit.txt",
        "metrics_test.txt",
    ):
        assert (run / name).is_file(), name
    assert any((run / "checkpoints").glob("best-*.ckpt")) and (run / "export" / "model.safetensors").is_file()
    loggers = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]
    assert [logger["class_path"] for logger in loggers] == [
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.MLFlowLogger",
    ]
    # As the recipe gave them: the places the run chose are not pinned into it.
    assert loggers[0]["init_args"]["name"] == "lightning_logs" and loggers[0]["init_args"]["sub_dir"] is None
    assert loggers[1]["init_args"]["tracking_uri"] is None and loggers[1]["init_args"]["run_name"] is None


@pytest.mark.slow
def test_tensorboard_holds_the_scalars_of_metrics_csv_the_recipe_and_the_plan(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run = tracked_run
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = csv_series(run)
    # hp_metric: TensorBoardLogger's placeholder beside hyperparameters (default_hp_metric), not a metric.
    tags = set(events.Tags()["scalars"]) - {"hp_metric"}
    assert tags == set(expected) and {"train/loss", "val/acc", "test/acc", "epoch"} <= tags
    for tag in tags:
        scalars = [(event.step, event.value) for event in events.Scalars(tag)]
        assert [step for step, _ in scalars] == [step for step, _ in expected[tag]], tag
        assert [value for _, value in scalars] == pytest.approx([v for _, v in expected[tag]], rel=1e-6), tag

    texts = {tag.partition("/")[0]: events.Tensors(tag)[0].tensor_proto for tag in events.Tags()["tensors"]}
    for name in ("plan.txt", "config.yaml"):
        assert textwrap.dedent(texts[name].string_val[0].decode()) == (run / name).read_text(), name
    # The hyperparameters TensorBoard shows (the first set logged) are the flattened recipe.
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    shown = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert shown["optimizer.lr"].number_value == 0.003 and shown["trainer.max_epochs"].number_value == 2
    assert shown["model.class_path"].string_value == "finetune.ClassificationTask"


@pytest.mark.slow
def test_mlflow_holds_the_metrics_of_metrics_csv_the_recipe_and_its_files(tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    root, run = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("recipe")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "version_0" and tracked.data.tags["run_dir"] == str(run.resolve())
    for key, series in csv_series(run).items():
        # Lightning's MLFlowLogger drops the characters MLflow refuses in names: "lr/head (no decay)".
        history = client.get_metric_history(tracked.info.run_id, re.sub("[^a-zA-Z0-9_/. -]+", "", key))
        assert sorted((m.step, m.value) for m in history) == sorted(series), key

    params = tracked.data.params
    assert params["optimizer.lr"] == "0.003" and params["model.class_path"] == "finetune.ClassificationTask"
    assert params["data.init_args.batch_size"] == "4"
    assert {a.path for a in client.list_artifacts(tracked.info.run_id)} >= {"config.yaml", "plan.txt"}
    plan = client.download_artifacts(tracked.info.run_id, "plan.txt", str(tmp_path))
    assert Path(plan).read_text() == (run / "plan.txt").read_text()


def test_trackers_take_the_run_folders_version_and_keep_what_the_recipe_sets(tmp_path):
    (tmp_path / "recipe" / "version_0").mkdir(parents=True)  # an earlier run
    csv, board = run_loggers([(TensorBoardLogger, {})], tmp_path, "recipe")
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path / "recipe" / "version_1"
    assert Path(board.log_dir) == tmp_path / "recipe" / "version_1" / "tensorboard"

    elsewhere = tmp_path / "elsewhere"
    _, board = run_loggers(
        [(TensorBoardLogger, {"save_dir": str(elsewhere), "name": "mine"})], tmp_path, "recipe"
    )
    assert Path(board.log_dir) == elsewhere / "mine" / "version_1" / "tensorboard"
    (own,) = run_loggers(
        [(CSVLogger, {"name": "mine"})], tmp_path, "recipe"
    )  # the recipe's CSV takes the place
    assert Path(own.log_dir) == tmp_path / "mine" / "version_0"


def test_the_recipe_flattens_to_dotted_keys():
    recipe = {"trainer": {"callbacks": [{"class_path": "EMA", "init_args": {"decay": 0.9}}], "plugins": []},
              "optimizer": {"lr": 0.001, "betas": [0.9, 0.99], "groups": []}, "seed_everything": None,
              "data": {"init_args": {"weird key(1)": 1}}}  # fmt: skip
    assert flatten(recipe) == {
        "trainer.callbacks.0.class_path": "EMA",
        "trainer.callbacks.0.init_args.decay": 0.9,
        "trainer.plugins": "[]",
        "optimizer.lr": 0.001,
        "optimizer.betas.0": 0.9,
        "optimizer.betas.1": 0.99,
        "optimizer.groups": "[]",
        "seed_everything": None,
        "data.init_args.weird key_1_": 1,
    }


@pytest.mark.parametrize(
    ("logger", "error"),
    [
        ("TensorBoard", "trainer.logger: 'TensorBoard' is not a logger; name one of TensorBoardLogger, "),
        (
            ["MLFlowLogger", "mlflow"],
            "trainer.logger: 'mlflow' is not a logger; name one of TensorBoardLogger, ",
        ),
        (
            "TensorBoardLogger",
            "trainer.logger.TensorBoardLogger.save_dir: TensorBoardLogger requires it (the runs",
        ),
    ],
)
def test_a_bad_logger_is_one_line_naming_the_key(logger, error, tiny_bert_dir, text_csv, tmp_path, capsys):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"]["logger"] = logger
    assert main([str(write(recipe, tmp_path / "recipe.yaml"))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"finetune: error: {error}")


def wandb_records(run_file: Path, kind: str) -> list[dict]:
    """The ``kind`` records (``history``: logged rows; ``config``: updates of the run's config) of an offline
    W&B run, as dicts. Its ``.wandb`` transaction log is a LevelDB log (32 KiB blocks of records with a 7-byte
    header, after a 7-byte ``:W&B`` file header) of wandb's own protobuf ``Record``s; wandb 0.31 no longer
    ships a Python reader."""
    from wandb.proto import wandb_internal_pb2

    data, found, chunk, offset = run_file.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        if 32768 - offset % 32768 < 7:  # a block's tail too short for a header is padding
            offset += 32768 - offset % 32768
            continue
        _, length, part = struct.unpack("<IHB", data[offset : offset + 7])
        chunk, offset = chunk + data[offset + 7 : offset + 7 + length], offset + 7 + length
        if part in (1, 4):  # FULL, or the LAST part of a record split over blocks
            record = wandb_internal_pb2.Record.FromString(chunk)
            if record.WhichOneof("record_type") == kind:
                items = record.history.item if kind == "history" else record.config.update
                found.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
            chunk = b""
    return found


@pytest.mark.slow
def test_wandb_offline_holds_the_metrics_of_metrics_csv_and_the_recipe(tiny_bert_dir, text_csv, tmp_path):
    wandb = pytest.importorskip("wandb")  # an optional tracker: installed with finetune[trackers]
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path / "runs")
    recipe["trainer"].update(
        {"max_epochs": 1, "logger": {"class_path": "WandbLogger", "init_args": {"offline": True}}}
    )
    assert main([str(write(recipe, tmp_path / "recipe.yaml"))]) == 0
    wandb.finish()  # what the process's exit does: the run's log is written out
    run = tmp_path / "runs" / "recipe" / "version_0"
    (offline,) = (run / "wandb").glob("offline-run-*")
    log = next(offline.glob("run-*.wandb"))
    rows = wandb_records(log, "history")
    for key, series in csv_series(run).items():
        logged = [(row["trainer/global_step"], row[key]) for row in rows if key in row]
        assert sorted(logged) == sorted(series), key
    config = {key: value for update in wandb_records(log, "config") for key, value in update.items()}
    assert config["optimizer.lr"] == 0.003 and config["model.class_path"] == "finetune.ClassificationTask"
    saved = offline / "files" / run.name
    assert (saved / "plan.txt").read_text() == (run / "plan.txt").read_text()
    assert (saved / "config.yaml").read_text() == (run / "config.yaml").read_text()
