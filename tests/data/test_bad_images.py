"""Unreadable images are found when a split is read, before training: refused with their list, or skipped."""

from __future__ import annotations

import logging
import shutil

import pytest

from finetune.data import ImageClassificationData
from finetune.errors import RecipeError


def test_bad_images_are_refused_or_skipped_and_counted(image_folder, tiny_timm_checkpoint, tmp_path, caplog):
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    (folder / "red" / "empty.png").write_bytes(b"")
    (folder / "blue" / "cut.png").write_bytes((folder / "blue" / "0.png").read_bytes()[:60])
    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    strict = ImageClassificationData(train=str(folder), backbone=backbone, val_fraction=0.25)
    with pytest.raises(RecipeError, match=r"data.train: 2 images cannot be read \(.*cut.png, .*empty.png\)"):
        strict.setup("fit")
    lenient = ImageClassificationData(
        train=str(folder), backbone=backbone, val_fraction=0.25, skip_bad_images=True
    )
    with caplog.at_level(logging.WARNING):
        lenient.setup("fit")
    assert "skipped 2 unreadable images of 26" in caplog.text
    kept = len(lenient.split_dataset("train")) + len(lenient.split_dataset("val"))
    assert kept == 24
