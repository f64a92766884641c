"""Splits, labels, seeded carving and sampling, state, and the recipe errors of ClassificationData."""

from __future__ import annotations

import json

import pytest

from finetune.data import TextClassificationData
from finetune.data.loaders import EpochShuffleSampler
from finetune.errors import RecipeError


@pytest.fixture
def hundred_rows(write_csv):
    """100 rows with a unique ``id`` so splits can be compared row by row."""
    return write_csv(
        "rows.csv", id=list(range(100)), text=[f"row {i}" for i in range(100)], label=["a", "b"] * 50
    )


def ids(data, split):
    return set(data.table(split)["id"])


def test_string_labels_are_sorted(write_csv):
    path = write_csv("t.csv", text=["x"] * 4, label=["pos", "neg", "neu", "pos"])
    assert TextClassificationData(train=str(path)).labels == ["neg", "neu", "pos"]


def test_integer_labels_sort_numerically(write_csv):
    path = write_csv("t.csv", text=["x"] * 4, label=[10, 2, 1, 2])
    assert TextClassificationData(train=str(path)).labels == ["1", "2", "10"]


def test_explicit_labels_keep_their_order(write_csv):
    path = write_csv("t.csv", text=["x"] * 3, label=["pos", "neg", "pos"])
    assert TextClassificationData(train=str(path), labels=["pos", "neg", "neu"]).labels == [
        "pos",
        "neg",
        "neu",
    ]


def test_carving_is_seeded_disjoint_and_sized_by_the_fractions(hundred_rows):
    def carve(seed):
        data = TextClassificationData(train=str(hundred_rows), val_fraction=0.1, test_fraction=0.2, seed=seed)
        return {split: ids(data, split) for split in ("train", "val", "test")}

    first = carve(seed=1)
    assert {split: len(rows) for split, rows in first.items()} == {"train": 70, "val": 10, "test": 20}
    assert first["train"] | first["val"] | first["test"] == set(range(100))
    assert not (
        first["train"] & first["val"] or first["train"] & first["test"] or first["val"] & first["test"]
    )
    assert carve(seed=1) == first
    assert carve(seed=2)["val"] != first["val"]


def test_given_val_file_is_not_carved_from_train(hundred_rows, write_csv):
    val = write_csv("val.csv", id=[1000], text=["x"], label=["a"])
    data = TextClassificationData(train=str(hundred_rows), val=str(val), val_fraction=0.3)
    assert len(data.table("train")) == 100 and ids(data, "val") == {1000}
    assert data.table("test") is None


def test_limit_subsamples_train_before_carving(hundred_rows):
    def sample(seed):
        data = TextClassificationData(train=str(hundred_rows), limit=30, val_fraction=0.1, seed=seed)
        assert (len(data.table("train")), len(data.table("val"))) == (27, 3)
        return ids(data, "train") | ids(data, "val")

    assert len(sample(seed=0)) == 30
    assert sample(seed=0) == sample(seed=0) != sample(seed=1)


def test_sampler_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = EpochShuffleSampler(50, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(3, 0)) == list(range(50))
    assert order(3, 0) == order(3, 0) and order(3, 1) == order(3, 1)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)


def test_train_loader_shuffles_by_epoch_and_eval_loaders_keep_order(text_csv, bert_backbone):
    def loader_order(epoch):
        data = TextClassificationData(train=str(text_csv), backbone=bert_backbone, batch_size=16)
        data.setup("fit")
        loader = data.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["index"].tolist()]

    assert loader_order(0) == loader_order(0) != loader_order(1)
    data = TextClassificationData(train=str(text_csv), backbone=bert_backbone, batch_size=4)
    data.setup("fit")
    val_order = [i for batch in data.val_dataloader() for i in batch["index"].tolist()]
    assert val_order == list(range(len(data.table("val"))))


def test_lightning_sets_the_sampler_epoch(text_csv, bert_backbone):
    import lightning.pytorch as pl
    import torch

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return self.weight.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TextClassificationData(train=str(text_csv), backbone=bert_backbone, batch_size=100, val_fraction=0)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    expected = []
    for epoch in (0, 1):
        sampler = EpochShuffleSampler(80, data.seed)
        sampler.set_epoch(epoch)
        expected.append(list(sampler))
    assert model.seen == expected


def test_predict_defaults_to_test_then_val(hundred_rows, write_csv):
    with_test = TextClassificationData(train=str(hundred_rows), test_fraction=0.2)
    assert set(with_test.predict_table()["id"]) == ids(with_test, "test")
    val_only = TextClassificationData(train=str(hundred_rows))
    assert set(val_only.predict_table()["id"]) == ids(val_only, "val")
    given = write_csv("new.csv", id=[7, 8], text=["a", "b"])
    assert list(
        TextClassificationData(train=str(hundred_rows), predict=str(given)).predict_table()["id"]
    ) == [
        7,
        8,
    ]


def test_labels_are_saved_and_restored(tmp_path, write_csv):
    path = write_csv("t.csv", text=["x"] * 3, label=[2, 10, 1])
    data = TextClassificationData(train=str(path))
    assert json.loads(data.save_labels(tmp_path / "out").read_text()) == ["1", "2", "10"]
    restored = TextClassificationData(predict=str(path))
    restored.load_state_dict(data.state_dict())
    assert restored.labels == ["1", "2", "10"]


def test_restoring_different_labels_is_an_error(write_csv):
    data = TextClassificationData(train=str(write_csv("t.csv", text=["x"] * 2, label=["a", "b"])))
    assert data.labels == ["a", "b"]
    with pytest.raises(RecipeError, match=r"^data\.labels: the checkpoint has labels"):
        data.load_state_dict({"labels": ["a", "c"]})


def test_unlabelled_predict_without_train_data_has_no_labels(write_csv, bert_backbone):
    path = write_csv("new.csv", text=["good movie", "bad"], label=["pos", "neg"])
    data = TextClassificationData(predict=str(path), backbone=bert_backbone)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert "labels" not in batch and batch["index"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"val_fraction": -0.1}, "data.val_fraction"),
        ({"test_fraction": 1.5}, "data.test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction"),
        ({"limit": 0}, "data.limit"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"eval_batch_size": 0}, "data.eval_batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"seed": -1}, "data.seed"),
        ({"labels": []}, "data.labels"),
        ({"labels": ["a", "a"]}, "data.labels"),
        ({"max_length": 0}, "data.max_length"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(RecipeError) as info:
        TextClassificationData(**kwargs)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("rows", "kwargs", "key", "message"),
    [
        (
            {"text": ["x"], "lbl": ["a"]},
            {},
            "data.label_column",
            "column 'label' not in t.csv; columns are: text, lbl",
        ),
        ({"body": ["x"], "label": ["a"]}, {}, "data.text_column", "column 'text' not in t.csv"),
        ({"text": ["x"], "label": ["a"]}, {"text_pair_column": "other"}, "data.text_pair_column", "'other'"),
        (
            {"text": ["x", "y"], "label": ["a", None]},
            {},
            "data.train",
            "1 rows of t.csv have no 'label' value",
        ),
        (
            {"text": ["x", "y"], "label": ["a", "b"]},
            {"labels": ["a"]},
            "data.labels",
            r"train labels \['b'\]",
        ),
    ],
)
def test_bad_train_tables_name_their_key(write_csv, rows, kwargs, key, message):
    data = TextClassificationData(train=str(write_csv("t.csv", **rows)), **kwargs)
    with pytest.raises(RecipeError, match=message) as info:
        data.labels  # noqa: B018 - reading the labels reads and checks the train table
    assert info.value.key == key


def test_val_labels_missing_from_train_are_an_error(write_csv, bert_backbone):
    train = write_csv("train.csv", text=["x", "y"], label=["a", "b"])
    val = write_csv("val.csv", text=["x", "y"], label=["a", "x"])
    data = TextClassificationData(train=str(train), val=str(val), backbone=bert_backbone)
    with pytest.raises(RecipeError, match=r"^data\.val: labels \['x'\] do not occur in train"):
        data.setup("fit")


def test_missing_files_and_splits_name_their_key(tmp_path, write_csv, bert_backbone):
    with pytest.raises(RecipeError, match=r"^data\.train: .*missing\.csv does not exist"):
        TextClassificationData(train=str(tmp_path / "missing.csv")).labels  # noqa: B018
    with pytest.raises(RecipeError, match=r"^data\.train: .* is a folder"):
        TextClassificationData(train=str(tmp_path)).labels  # noqa: B018
    predict_only = TextClassificationData(predict=str(write_csv("p.csv", text=["x"])), backbone=bert_backbone)
    with pytest.raises(RecipeError, match=r"^data\.train: no train data"):
        predict_only.setup("fit")
    with pytest.raises(RecipeError, match=r"^data\.test: no test data"):
        predict_only.setup("test")
    train = write_csv("t.csv", text=["x", "y"], label=["a", "b"])
    with pytest.raises(RecipeError, match=r"^data\.backbone: "):
        TextClassificationData(train=str(train)).setup("fit")
