"""TextClassificationData: tokenisation, dynamic padding, text pairs and Hugging Face dataset folders."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data import TextClassificationData
from finetune.errors import RecipeError


def first_batch(data, stage="fit"):
    data.setup(stage)
    loader = data.predict_dataloader() if stage == "predict" else data.train_dataloader()
    return next(iter(loader))


def test_batches_are_padded_to_their_longest_row(write_csv, bert_backbone):
    texts = ["good", "good movie very good day", "bad day", "not okay"]
    path = write_csv("t.csv", text=texts, label=["pos", "pos", "neg", "neg"])
    data = TextClassificationData(
        predict=str(path), backbone=bert_backbone, labels=["neg", "pos"], max_length=64
    )
    batch = first_batch(data, "predict")
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [3, 7, 4, 4]  # [CLS] words [SEP]
    assert batch["input_ids"].shape == (4, 7)
    assert batch["labels"].tolist() == [1, 1, 0, 0]
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_labels_and_index_point_at_the_same_rows(text_csv, bert_backbone):
    data = TextClassificationData(train=str(text_csv), backbone=bert_backbone, batch_size=8)
    batch = first_batch(data)
    rows = data.table("train").select(batch["index"].tolist())
    assert [data.labels[i] for i in batch["labels"].tolist()] == list(rows["label"])
    assert batch["labels"].dtype == batch["index"].dtype == batch["input_ids"].dtype


def test_texts_are_truncated_to_max_length(write_csv, bert_backbone):
    path = write_csv("t.csv", text=["good movie very good day food"], label=["pos"])
    data = TextClassificationData(predict=str(path), backbone=bert_backbone, labels=["pos"], max_length=4)
    assert first_batch(data, "predict")["input_ids"].shape == (1, 4)


def test_text_pairs_are_encoded_as_two_segments(write_csv, bert_backbone):
    path = write_csv("t.csv", premise=["good movie"], hypothesis=["bad day food"], label=["no"])
    data = TextClassificationData(
        predict=str(path), backbone=bert_backbone, text_column="premise", text_pair_column="hypothesis"
    )
    assert first_batch(data, "predict")["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_empty_text_cells_become_empty_texts(write_csv, bert_backbone):
    path = write_csv("t.csv", text=["good", None], label=["pos", "neg"])
    data = TextClassificationData(predict=str(path), backbone=bert_backbone, labels=["neg", "pos"])
    assert first_batch(data, "predict")["attention_mask"].sum(dim=1).tolist() == [3, 2]


def test_dataset_folder_supplies_the_splits(tmp_path, monkeypatch, bert_backbone):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "reviews"
    folder.mkdir()
    for split, size in (("train", 6), ("validation", 3), ("test", 2)):
        rows = "".join(f"good movie {i},{'pos' if i % 2 else 'neg'}\n" for i in range(size))
        (folder / f"{split}.csv").write_text("text,label\n" + rows)
    data = TextClassificationData(dataset=str(folder), backbone=bert_backbone, val_fraction=0.5)
    assert [len(data.table(split)) for split in ("train", "val", "test")] == [6, 3, 2]
    assert data.labels == ["neg", "pos"]
    assert first_batch(data)["input_ids"].shape[0] == 6


def test_unloadable_dataset_names_its_key(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = TextClassificationData(dataset="no-such-user/no-such-dataset")
    with pytest.raises(RecipeError, match=r"^data\.dataset: cannot load 'no-such-user/no-such-dataset'"):
        data.labels  # noqa: B018 - reading the labels loads the dataset


def test_class_label_ids_become_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    from finetune.data.rows import ArrowRows

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos", "unused"])})
    split = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, -1]}, features=features)
    rows = ArrowRows(split, "classlabel-test", tmp_path)
    assert rows.label_names("label") == {"pos", "neg"} and rows.missing("label") == 1  # -1: unlabelled
    labelled = rows.take(np.array([0, 1]))
    assert labelled.label_ids("label", {"neg": 5, "pos": 7}).take([0, 1]).tolist() == [7, 5]
