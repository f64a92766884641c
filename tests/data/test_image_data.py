"""ImageClassificationData: class folders, path tables, the backbone's transforms and layout errors."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from finetune.data import ImageClassificationData
from finetune.data import image as image_data
from finetune.data.splits import hold_out
from finetune.errors import RecipeError


@pytest.fixture
def input_shape(vit_backbone):
    """(C, H, W) that the backbone's eval transform produces: what every batch must match."""
    return tuple(vit_backbone.image_transform(train=False)(Image.new("RGB", (40, 40))).shape)


@pytest.fixture
def image_table(tmp_path, image_folder):
    """A CSV beside an ``imgs/`` folder, listing 4 images by relative path."""
    (tmp_path / "imgs").mkdir()
    lines = ["file,kind"]
    for label in ("red", "blue"):
        for i in range(2):
            shutil.copy(image_folder / label / f"{i}.png", tmp_path / "imgs" / f"{label}{i}.png")
            lines.append(f"imgs/{label}{i}.png,{label}")
    path = tmp_path / "images.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_class_folders_give_labels_and_pixel_values(image_folder, vit_backbone, input_shape):
    data = ImageClassificationData(
        train=str(image_folder), backbone=vit_backbone, batch_size=5, val_fraction=0.25
    )
    data.setup("fit")
    assert data.labels == ["blue", "red"]
    assert (len(data.table("train")), len(data.table("val"))) == (18, 6)
    batch = next(iter(data.train_dataloader()))
    assert batch["pixel_values"].shape == (5, *input_shape)
    assert batch["pixel_values"].is_floating_point()
    folders = [p.split("/")[-2] for p in data.table("train").select(batch["index"].tolist())["path"]]
    assert [data.labels[i] for i in batch["labels"].tolist()] == folders


def test_splits_are_memory_mapped_and_hold_out_the_seeded_rows(image_folder, vit_backbone):
    """The same rows as holding out from the sorted folder listing with ``hold_out`` (what the DataFrame
    version kept), and every split read from an Arrow file in the cache rather than held in memory."""
    data = ImageClassificationData(train=str(image_folder), backbone=vit_backbone, val_fraction=0.25, seed=3)
    data.setup("fit")
    listing = sorted(str(p) for p in image_folder.glob("*/*.png"))
    picked = hold_out(len(listing), {"val": 0.25}, 3, None)
    for split in ("train", "val"):
        assert data.table(split)["path"] == [listing[i] for i in picked[split]]
        assert data.table(split).cache_files, f"{split} is not memory-mapped"
    assert data.split_dataset("train").paths.cache_files


def test_only_the_train_split_gets_the_train_transform(image_folder, vit_backbone):
    data = ImageClassificationData(train=str(image_folder), backbone=vit_backbone, augment="timm")
    data.setup("fit")
    assert "RandomResizedCrop" in repr(data.split_dataset("train").transform)
    assert "RandomResizedCrop" not in repr(data.split_dataset("val").transform)


def test_by_default_training_images_are_prepared_as_evaluation(image_folder, vit_backbone):
    data = ImageClassificationData(train=str(image_folder), backbone=vit_backbone)
    data.setup("fit")
    train, val = data.split_dataset("train").transform, data.split_dataset("val").transform
    assert repr(train) == repr(val) and "Random" not in repr(train)
    assert data.split_dataset("train").mixer is None


def test_tables_resolve_paths_from_their_folder(image_table, vit_backbone, input_shape):
    data = ImageClassificationData(
        predict=str(image_table),
        path_column="file",
        label_column="kind",
        labels=["red", "blue"],
        backbone=vit_backbone,
    )
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["pixel_values"].shape == (4, *input_shape)
    assert batch["labels"].tolist() == [0, 0, 1, 1]
    assert all(path.startswith(str(image_table.parent)) for path in data.predict_table()["file"])


def test_resolved_paths_are_cached(image_table, vit_backbone, monkeypatch):
    """A second build of the same table reads its resolved paths from the cache instead of resolving them."""

    def build():
        data = ImageClassificationData(
            predict=str(image_table), path_column="file", label_column="kind", labels=["red", "blue"]
        )
        return data.predict_table()["file"]

    first = build()
    monkeypatch.setattr(image_data, "_resolve", lambda *args, **kwargs: pytest.fail("resolved again"))
    assert build() == first


def test_a_flat_folder_predicts_without_labels(tmp_path, image_folder, vit_backbone):
    for i in range(3):
        shutil.copy(image_folder / "red" / f"{i}.png", tmp_path / f"{i}.png")
    data = ImageClassificationData(predict=str(tmp_path), labels=["blue", "red"], backbone=vit_backbone)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert "labels" not in batch and batch["index"].tolist() == [0, 1, 2]


def test_listed_images_that_do_not_exist_are_an_error(image_table):
    (image_table.parent / "imgs" / "red1.png").unlink()
    data = ImageClassificationData(train=str(image_table), path_column="file", label_column="kind")
    with pytest.raises(RecipeError, match=r"^data\.train: 1 images listed in images\.csv do not exist"):
        data.labels  # noqa: B018 - reading the labels reads the train table


def test_layout_errors_name_their_key(tmp_path, image_table):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"^data\.train: .*empty has no images"):
        ImageClassificationData(train=str(tmp_path / "empty")).labels  # noqa: B018
    with pytest.raises(RecipeError, match=r"^data\.path_column: column 'path' not in images\.csv"):
        ImageClassificationData(train=str(image_table), label_column="kind").labels  # noqa: B018
