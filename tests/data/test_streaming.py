"""Streaming text data: a seeded order per epoch, every row read once per epoch over processes and workers,
resuming mid-stream at the next row, trainer.max_steps required, and what a stream cannot do refused."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from finetune.data.streaming import StreamPosition, TableStream, shuffle_buffer
from finetune.errors import RecipeError
from tests.helpers.stream_run import Recorder, stream_data, trainer

ROWS = 40
REPOSITORY = Path(__file__).parents[2]


@pytest.fixture
def stream_csv(tmp_path) -> Path:
    path = tmp_path / "stream.csv"
    texts = [f"good movie {'very ' * (i % 4)}day" for i in range(ROWS)]
    pd.DataFrame({"text": texts, "label": ["neg", "pos"] * (ROWS // 2)}).to_csv(path, index=False)
    return path


def stream(path: Path, **kwargs) -> TableStream:
    options = dict(collate=list, seed=3, buffer=8, batch_size=4)
    return TableStream([path], "data.train", "auto", ["text", "label"], **(options | kwargs))


def indices(rows) -> list[int]:
    return [row["index"] for row in rows]


def test_the_order_depends_only_on_seed_and_epoch(stream_csv):
    def order(epoch, seed=3):
        rows = stream(stream_csv, seed=seed)
        rows.epoch = epoch
        return indices(rows)

    assert sorted(order(0)) == sorted(order(1)) == list(range(ROWS))
    assert order(0) == order(0) and order(1) == order(1)
    assert order(0) != order(1) and order(0) != list(range(ROWS))
    assert order(0, seed=4) != order(0)


@pytest.mark.parametrize(("world_size", "rows"), [(2, ROWS), (3, ROWS), (4, 38)])
def test_consumers_share_the_rows_without_duplicates(tmp_path, world_size, rows):
    path = tmp_path / "s.csv"
    pd.DataFrame({"text": ["x"] * rows, "label": ["a"] * rows}).to_csv(path, index=False)
    shares = [indices(stream(path, rank=rank, world_size=world_size)) for rank in range(world_size)]
    read = [i for share in shares for i in share]
    assert len(read) == len(set(read)) == rows - rows % world_size  # an incomplete last group is dropped
    assert len({len(share) for share in shares}) == 1  # every process steps as often


def test_the_shuffling_buffer_is_seeded_and_keeps_every_item():
    import numpy as np

    def shuffled(seed):
        return list(shuffle_buffer(iter(range(100)), 10, np.random.default_rng(seed)))

    assert sorted(shuffled(0)) == list(range(100)) and shuffled(0) == shuffled(0) != shuffled(1)


def test_a_stream_starting_mid_epoch_skips_the_batches_taken(stream_csv):
    full = indices(stream(stream_csv))
    resumed = stream(stream_csv, start=StreamPosition(0, 3))
    assert indices(resumed) == indices(resumed) == full[12:]  # that epoch, read again: the same rows
    resumed.epoch = 1
    assert indices(resumed) == indices(stream(stream_csv, start=StreamPosition(1, 0)))  # later ones: whole


def test_streams_pickle_without_their_rows(stream_csv, bert_backbone):
    data = stream_data(bert_backbone, str(stream_csv))
    train = data.split_dataset("train")
    blob = pickle.dumps(train)
    assert len(blob) < 50_000  # the tokenizer and settings; rows are read from the file
    copy = pickle.loads(blob)
    assert indices(copy) == indices(train)
    rows = list(stream(stream_csv))[:4]
    batch = copy.collate(rows)
    assert batch["index"].tolist() == indices(rows)
    assert batch["labels"].tolist() == [["neg", "pos"].index(row["label"]) for row in rows]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_stream_continues_at_the_next_row(stream_csv, bert_backbone, tmp_path, workers):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # 10 batches per epoch: step 12 is batch 2 of epoch 1.
    whole = Recorder()
    trainer(14).fit(whole, datamodule=stream_data(bert_backbone, str(stream_csv), num_workers=workers))
    assert [epoch for epoch, _ in whole.seen] == [0] * 10 + [1] * 4
    assert sorted(i for _, rows in whole.seen[:10] for i in rows) == list(range(ROWS))

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    interrupted = Recorder()
    fit = trainer(14, callbacks=[saver], enable_checkpointing=True)
    fit.fit(interrupted, datamodule=stream_data(bert_backbone, str(stream_csv), num_workers=workers))
    checkpoint = next((tmp_path / "ckpt").glob("*step=12.ckpt"))
    assert interrupted.seen == whole.seen

    resumed = Recorder()
    data = stream_data(bert_backbone, str(stream_csv), num_workers=workers)
    trainer(14).fit(resumed, datamodule=data, ckpt_path=checkpoint)
    assert resumed.seen == whole.seen[12:]
    assert data.state_dict()["stream"] == {"epoch": 1, "batches": 4}


def test_streaming_needs_max_steps(stream_csv, bert_backbone):
    fit = trainer(-1, max_epochs=1)
    with pytest.raises(RecipeError, match=r"^trainer\.max_steps: streaming data .* has no length") as info:
        fit.fit(Recorder(), datamodule=stream_data(bert_backbone, str(stream_csv)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"val_fraction": 0.1}, "data.val_fraction"),
        ({"test_fraction": 0.2}, "data.test_fraction"),
        ({"limit": 10}, "data.limit"),
        ({"dataset": "some/dataset"}, "data.streaming"),
        ({"train": None}, "data.train"),
        ({"shuffle_buffer": 0}, "data.shuffle_buffer"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_at_load(stream_csv, bert_backbone, kwargs, key):
    train = kwargs.pop("train", str(stream_csv))
    with pytest.raises(RecipeError) as info:
        stream_data(bert_backbone, train, **kwargs)
    assert info.value.key == key


def test_the_plan_can_say_how_far_the_run_reads_the_stream(stream_csv, bert_backbone):
    data = stream_data(bert_backbone, str(stream_csv), num_workers=0)
    fit = trainer(25)
    fit.fit(Recorder(), datamodule=data)
    lines = data.describe_data().splitlines()
    assert lines[1].startswith("train: streamed from 1 file(s), rows unknown; a shuffling buffer of 8 rows")
    assert lines[2] == "the run ends at trainer.max_steps = 25 optimizer steps (100 rows at 4 a step)"
    assert lines[3] == "loader workers per process: 0"


def test_labels_are_read_from_the_stream_when_not_given(stream_csv, bert_backbone):
    data = stream_data(bert_backbone, str(stream_csv), labels=None)
    assert data.labels == ["neg", "pos"]
    assert data.table("train") is None


@pytest.mark.slow
def test_two_ddp_processes_read_every_row_once_per_epoch(stream_csv, tiny_bert_dir, tmp_path):
    out = tmp_path / "seen.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPOSITORY / "tests/helpers/stream_run.py"),
            str(tiny_bert_dir),
            str(stream_csv),
            "10",
            str(out),
        ],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert [len(steps) for steps in seen] == [10, 10]  # 20 rows a process: 5 batches of 4, two epochs
    orders = []
    for epoch in (0, 1):
        shares = [[i for e, rows in steps if e == epoch for i in rows] for steps in seen]
        read = shares[0] + shares[1]
        assert sorted(read) == list(range(ROWS))  # every row once, none twice
        orders.append(read)
    assert orders[0] != orders[1]
