"""Image classification data: class-per-folder layouts or tables of image paths, transformed for the backbone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from finetune.data.classification import ClassificationData, NamedTable, RowDataset
from finetune.errors import RecipeError

IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


class ImageDataset(RowDataset):
    """Images opened on access, converted to RGB and transformed; batches stack into ``pixel_values``."""

    def __init__(
        self, paths: list[str], transform: Callable[[Any], torch.Tensor], label_ids: list[int] | None
    ) -> None:
        super().__init__(len(paths), label_ids)
        self.paths = paths
        self.transform = transform

    def inputs(self, row: int) -> dict[str, Any]:
        from PIL import Image

        with Image.open(self.paths[row]) as image:
            return {"pixel_values": self.transform(image.convert("RGB"))}

    def collate_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}


class ImageClassificationData(ClassificationData):
    """Classify images from class folders or tables of image paths.

    Each split is a folder with one sub-folder per class (``FOLDER/CLASS/x.jpg``), a folder of unlabelled
    images (for predict), or a table with a path column and a label column.
    """

    def __init__(self, path_column: str = "path", **kwargs: Any) -> None:
        """
        Args:
            path_column: in table files, the column holding image paths (relative ones are read from the
                table's folder).
        """
        super().__init__(**kwargs)
        self.path_column = path_column

    def input_columns(self) -> dict[str, str]:
        return {"data.path_column": self.path_column}

    def read_path(self, path: Path, key: str) -> NamedTable:
        if path.is_dir():
            return NamedTable(self._scan(path, key), path.name)
        rows, name = super().read_path(path, key)
        if self.path_column not in rows.columns:
            return NamedTable(rows, name)  # the base class reports the missing column
        rows = rows.copy()
        rows[self.path_column] = [str(path.parent / str(p)) for p in rows[self.path_column]]
        absent = [p for p in rows[self.path_column] if not Path(p).is_file()]
        if absent:
            raise RecipeError(
                key,
                f"{len(absent)} images listed in {name} do not exist, e.g. {absent[0]}; "
                f"relative paths are read from {path.parent}",
            )
        return NamedTable(rows, name)

    def _scan(self, folder: Path, key: str) -> pd.DataFrame:
        """``FOLDER/CLASS/image`` -> rows (path, label); images directly in ``FOLDER`` -> rows without labels."""
        nested = _images(folder, "*/*")
        if nested:
            return pd.DataFrame(
                {
                    self.path_column: [str(p) for p in nested],
                    self.label_column: [p.parent.name for p in nested],
                }
            )
        flat = _images(folder, "*")
        if flat:
            return pd.DataFrame({self.path_column: [str(p) for p in flat]})
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise RecipeError(key, f"{folder} has no images ({extensions}); lay it out as FOLDER/CLASS/IMAGE")

    def make_dataset(self, rows: pd.DataFrame, split: str, label_ids: list[int] | None) -> ImageDataset:
        transform = self.backbone_spec().image_transform(train=split == "train")
        return ImageDataset(rows[self.path_column].tolist(), transform, label_ids)


def _images(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
