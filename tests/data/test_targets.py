"""Multi-label and regression targets in ClassificationData: both multi-label layouts, standardised float
targets, the batches they make, their checkpoint state and the one-line errors of bad keys and bad cells."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from finetune.data import ImageClassificationData, TextClassificationData
from finetune.data.targets import TargetStatistics
from finetune.errors import RecipeError

TEXTS = ["good movie", "bad day", "very good", "awful food", "okay", "fine day"]


def batch_of(data, split="train"):
    dataset = data.split_dataset(split)
    return dataset.collate(dataset.__getitems__(list(range(len(dataset)))))


def text_data(path, backbone, **keys):
    return TextClassificationData(train=str(path), val_fraction=0.0, backbone=backbone, **keys)


# --- multi-label ---------------------------------------------------------------------------------------


def test_a_separated_label_column_gives_multi_hot_float_rows(write_csv, bert_backbone):
    tags = ["b|a", "b", None, " c | a ", "a", "b|c|"]
    path = write_csv("t.csv", text=TEXTS, tags=tags)
    data = text_data(path, bert_backbone, label_column="tags", label_separator="|")
    assert data.target_kind == "multi_label"
    assert data.labels == ["a", "b", "c"]  # sorted, spaces dropped, an empty piece is no label
    labels = batch_of(data)["labels"]
    assert labels.dtype == torch.float32
    assert labels.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1], [1, 0, 0], [0, 1, 1]]


def test_a_given_label_list_orders_the_columns_and_unknown_labels_are_refused(write_csv, bert_backbone):
    path = write_csv("t.csv", text=TEXTS[:3], tags=["x;y", "y", "x"])
    data = text_data(path, bert_backbone, label_column="tags", label_separator=";", labels=["y", "x", "z"])
    assert batch_of(data)["labels"].tolist() == [[1, 1, 0], [1, 0, 0], [0, 1, 0]]
    val = write_csv("v.csv", text=TEXTS[:2], tags=["x", "x;w"])
    data = TextClassificationData(
        train=str(path), val=str(val), backbone=bert_backbone, label_column="tags", label_separator=";"
    )
    with pytest.raises(RecipeError, match=r"^data\.val: labels \['w'\] do not occur in train"):
        data.split_dataset("val")


def test_0_1_label_columns_name_the_labels(write_csv, bert_backbone):
    path = write_csv("t.csv", text=TEXTS[:3], toxic=[1, 0, 1], obscene=[0, 0, 1], kind=["a", "b", "c"])
    data = text_data(path, bert_backbone, label_columns=["toxic", "obscene"])
    assert data.labels == ["toxic", "obscene"]
    batch = batch_of(data)
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [[1, 0], [0, 0], [1, 1]]
    booleans = write_csv("b.csv", text=TEXTS[:2], toxic=[True, False], obscene=[0.0, 1.0])
    data = text_data(booleans, bert_backbone, label_columns=["toxic", "obscene"])
    assert batch_of(data)["labels"].tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize(
    ("column", "says"),
    [
        (
            [0, 2, 1],
            r"^data\.label_columns: 'toxic' of t\.csv holds 2 \(row 1\); each label column holds 0 or 1",
        ),
        (["0", "yes", "1"], r"^data\.label_columns: 'toxic' of t\.csv holds 'yes' \(row 1\)"),
        ([1.0, None, 0.0], r"^data\.train: 1 rows of t\.csv have no 'toxic' value"),
    ],
)
def test_a_0_1_column_with_other_values_is_refused(write_csv, bert_backbone, column, says):
    path = write_csv("t.csv", text=TEXTS[:3], toxic=column)
    with pytest.raises(RecipeError, match=says):
        text_data(path, bert_backbone, label_columns=["toxic"]).split_dataset("train")


def test_a_multi_label_column_without_any_label_is_refused(write_csv, bert_backbone):
    path = write_csv("t.csv", text=TEXTS[:2], tags=[None, None])
    data = text_data(path, bert_backbone, label_column="tags", label_separator="|")
    with pytest.raises(RecipeError, match=r"^data\.label_column: 'tags' holds no label in any train row"):
        data.labels  # noqa: B018


# --- regression ----------------------------------------------------------------------------------------


def test_targets_are_standardised_by_the_train_split(write_csv, bert_backbone):
    score = [1.0, 2.0, 4.0, 8.0, 3.0, 6.0]
    count = [1, 0, 3, 0, 2, 2]
    path = write_csv("t.csv", text=TEXTS, score=score, count=count)
    data = TextClassificationData(
        train=str(path), val_fraction=0.34, backbone=bert_backbone, target_columns=["score", "count"]
    )
    assert data.target_kind == "regression" and data.labels == ["score", "count"]
    train = data.table("train")
    raw = np.stack([np.array(train["score"], float), np.array(train["count"], float)], axis=1)
    mean, std = raw.mean(0), raw.std(0)  # the train split's (population) statistics, not val's
    statistics = data.target_statistics()
    assert np.allclose(statistics.mean, mean) and np.allclose(statistics.std, std)
    for split in ("train", "val"):
        rows = data.table(split)
        values = np.stack([np.array(rows["score"], float), np.array(rows["count"], float)], axis=1)
        labels = batch_of(data, split)["labels"]
        assert labels.dtype == torch.float32 and labels.shape == (len(rows), 2)
        assert np.allclose(labels.numpy(), (values - mean) / std, atol=1e-6)


def test_target_statistics_travel_in_the_data_state(write_csv, bert_backbone):
    path = write_csv("t.csv", text=TEXTS[:4], score=[1.0, 2.0, 3.0, 6.0])
    data = text_data(path, bert_backbone, target_columns=["score"])
    state = data.state_dict()
    assert state == {
        "labels": ["score"],
        "target_statistics": {"mean": [3.0], "std": [pytest.approx(1.8708287)]},
    }
    # Predicting from a checkpoint without train data: the restored statistics standardise labelled rows.
    restored = TextClassificationData(predict=str(path), backbone=bert_backbone, target_columns=["score"])
    assert restored.target_statistics() is None
    assert "labels" not in batch_of(restored, "predict")  # unknown statistics: predicted as unlabelled
    restored = TextClassificationData(predict=str(path), backbone=bert_backbone, target_columns=["score"])
    restored.load_state_dict(state)
    assert np.allclose(batch_of(restored, "predict")["labels"].numpy(), batch_of(data)["labels"].numpy())
    other = text_data(
        write_csv("o.csv", text=TEXTS[:2], score=[0.0, 1.0]), bert_backbone, target_columns=["score"]
    )
    other.setup("fit")
    with pytest.raises(RecipeError, match=r"^data\.train: this train split's target means/stds .* differ"):
        other.load_state_dict(state)
    with pytest.raises(RecipeError, match=r"^data\.target_columns: the checkpoint has \['score'\] but"):
        text_data(path, bert_backbone, target_columns=["other"]).load_state_dict(state)


@pytest.mark.parametrize(
    ("score", "says"),
    [
        (
            ["1.5", "abc", "2"],
            r"^data\.target_columns: 'score' of t\.csv holds values that are not numbers "
            r"\(e\.g\. 'abc', row 1\)",
        ),
        ([1.0, float("inf"), 2.0], r"^data\.train: 1 rows of t\.csv have a NaN or infinite 'score'"),
        ([1.0, None, 2.0], r"^data\.train: 1 rows of t\.csv have no 'score' value"),
        ([2.0, 2.0, 2.0], r"^data\.target_columns: 'score' is 2\.0 in every train row"),
    ],
)
def test_bad_targets_are_refused_in_one_line(write_csv, bert_backbone, score, says):
    path = write_csv("t.csv", text=TEXTS[:3], score=score)
    with pytest.raises(RecipeError, match=says):
        text_data(path, bert_backbone, target_columns=["score"]).split_dataset("train")


def test_the_predict_split_may_be_unlabelled(write_csv, bert_backbone):
    train = write_csv("t.csv", text=TEXTS[:3], score=[1.0, 2.0, 4.0], a=[1, 0, 1], b=[0, 1, 1])
    unlabelled = write_csv("p.csv", text=["good day", "bad"])
    for keys in ({"target_columns": ["score"]}, {"label_columns": ["a", "b"]}):
        data = TextClassificationData(
            train=str(train), predict=str(unlabelled), backbone=bert_backbone, **keys
        )
        data.setup("predict")
        batch = next(iter(data.predict_dataloader()))
        assert "labels" not in batch and batch["index"].tolist() == [0, 1]


# --- keys and layouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        (
            {"label_separator": "|", "label_columns": ["a"]},
            r"^data\.label_columns: cannot be combined with data\.label_separator",
        ),
        (
            {"label_columns": ["a"], "target_columns": ["s"]},
            r"^data\.target_columns: cannot be combined with data\.label_columns",
        ),
        ({"label_columns": ["a", "a"]}, r"^data\.label_columns: lists \['a'\] more than once"),
        ({"target_columns": []}, r"^data\.target_columns: is empty"),
        (
            {"label_columns": ["a"], "labels": ["a"]},
            r"^data\.labels: data\.label_columns names the labels; drop data\.labels",
        ),
        ({"label_separator": ""}, r"^data\.label_separator: is empty"),
        ({"target_columns": ["text"]}, r"^data\.text_column: 'text' is also a label, target"),
        (
            {"target_columns": ["s"], "streaming": True},
            r"^data\.streaming: streams one class per row; data\.target_columns",
        ),
    ],
)
def test_contradicting_keys_are_refused_in_one_line(text_csv, bert_backbone, keys, says):
    with pytest.raises(RecipeError, match=says):
        TextClassificationData(train=str(text_csv), backbone=bert_backbone, **keys)


def test_missing_target_columns_name_their_key(write_csv, bert_backbone):
    path = write_csv("t.csv", text=TEXTS[:2], score=[1.0, 2.0])
    with pytest.raises(
        RecipeError, match=r"^data\.target_columns: column 'rating' not in t\.csv; columns are: text, score"
    ):
        text_data(path, bert_backbone, target_columns=["score", "rating"]).split_dataset("train")
    with pytest.raises(RecipeError, match=r"^data\.label_columns: column 'toxic' not in t\.csv"):
        text_data(path, bert_backbone, label_columns=["toxic"]).split_dataset("train")


def test_targets_are_computed_once_into_the_cache(write_csv, bert_backbone, tmp_path):
    path = write_csv("t.csv", text=TEXTS, score=[1.0, 2.0, 4.0, 8.0, 3.0, 6.0])

    def build():
        data = text_data(path, bert_backbone, target_columns=["score"], cache_dir=str(tmp_path / "cache"))
        return batch_of(data)["labels"]

    first = build()
    files = sorted((tmp_path / "cache" / "targets").glob("*.arrow"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert np.array_equal(build().numpy(), first.numpy())
    assert files[0].stat().st_mtime_ns == stamp  # read back, not computed again


def test_the_task_and_the_data_must_agree(text_csv, write_csv, bert_backbone):
    from finetune.data.targets import TargetLayout, check_task

    multi = TargetLayout.of("tags", "|", None, None, None)
    with pytest.raises(
        RecipeError, match=r"^data\.label_separator: makes multi-label data, which ClassificationTask"
    ):
        check_task(multi, "class", "ClassificationTask")
    regression = TargetLayout.of("label", None, None, ["score"], None)
    with pytest.raises(RecipeError, match=r"^data\.target_columns: makes regression data, which Multi"):
        check_task(regression, "multi_label", "MultiLabelClassificationTask")
    single = TargetLayout.of("label", None, None, None, None)
    with pytest.raises(
        RecipeError, match=r"^data\.target_columns: RegressionTask needs float target columns"
    ):
        check_task(single, "regression", "RegressionTask")
    with pytest.raises(RecipeError, match=r"^data\.label_separator: Multi\w+ needs several labels per row"):
        check_task(single, "multi_label", "MultiLabelClassificationTask")
    check_task(regression, "regression", "RegressionTask")


# --- images --------------------------------------------------------------------------------------------


@pytest.fixture
def image_scores(tmp_path, image_folder):
    """A CSV of 6 image paths with a ``redness`` score and 0/1 ``red``/``blue`` columns."""
    rows = ["path,redness,red,blue"]
    for i, label in enumerate(["red", "blue"] * 3):
        shutil.copy(image_folder / label / f"{i}.png", tmp_path / f"{label}{i}.png")
        rows.append(
            f"{label}{i}.png,{i + (10 if label == 'red' else 0)},{int(label == 'red')},{int(label == 'blue')}"
        )
    path = tmp_path / "scores.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_image_tables_give_float_targets(image_scores, vit_backbone):
    data = ImageClassificationData(
        train=str(image_scores), val_fraction=0.0, backbone=vit_backbone, target_columns=["redness"]
    )
    redness = np.array([10, 1, 12, 3, 14, 5], float)
    labels = batch_of(data)["labels"]
    assert np.allclose(labels[:, 0].numpy(), (redness - redness.mean()) / redness.std(), atol=1e-6)
    data = ImageClassificationData(
        train=str(image_scores), val_fraction=0.0, backbone=vit_backbone, label_columns=["red", "blue"]
    )
    assert batch_of(data)["labels"].tolist() == [[1, 0], [0, 1]] * 3


def test_class_folders_and_mixing_take_one_class_per_image(image_folder, vit_backbone):
    data = ImageClassificationData(train=str(image_folder), backbone=vit_backbone, target_columns=["score"])
    with pytest.raises(
        RecipeError, match=r"^data\.train: .* is laid out as FOLDER/CLASS/IMAGE, one class per image"
    ):
        data.table("train")
    with pytest.raises(RecipeError, match=r"^data\.mixup: mixes one-class targets; data\.label_columns data"):
        ImageClassificationData(train=str(image_folder), label_columns=["red"], mixup=0.2)
    with pytest.raises(RecipeError, match=r"^data\.cutmix: mixes one-class targets; data\.label_separator"):
        ImageClassificationData(train=str(image_folder), label_separator="|", cutmix=1.0)


def test_target_statistics_round_trip_as_plain_data():
    statistics = TargetStatistics((1.0, 2.0), (0.5, 3.0))
    assert TargetStatistics.of(statistics.plain()) == statistics
    assert statistics.close_to(TargetStatistics((1.0 + 1e-9, 2.0), (0.5, 3.0)))
    assert not statistics.close_to(TargetStatistics((1.1, 2.0), (0.5, 3.0)))
