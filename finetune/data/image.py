"""Image classification data: class-per-folder layouts or tables of image paths, transformed for the backbone.

The image paths of every split live in memory-mapped Arrow (``finetune.data.arrow``), as text tables do: a
path table is converted once and its relative paths resolved once (both cached), a class-folder listing is
written to the cache, and a batch reads its rows' paths in one gather. Images are opened when a batch is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from typing_extensions import override

from finetune.backbones.base import ImageConfig
from finetune.batch import LABELS
from finetune.data.arrow import cached_map, column_values, fingerprint, memory_mapped, reopened
from finetune.data.classification import ClassificationData
from finetune.data.rows import ArrowRows, LabelIds, RowDataset
from finetune.data.split_data import NamedTable
from finetune.data.transforms import (
    DEFAULT_AUGMENT,
    BatchMixer,
    ImagePreparation,
    Interpolation,
    batch_mixer,
    describe,
)
from finetune.errors import RecipeError, require

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


class ImageDataset(RowDataset):
    """Images opened on access, converted to RGB and transformed; batches stack into ``pixel_values``.

    ``paths`` is a one-column memory-mapped Arrow dataset of image paths (pickled as its file, so loader
    workers get it cheaply). ``mixer`` (training only) mixes each labelled batch and adds its soft
    ``targets`` (``BatchMixer``).
    """

    def __init__(
        self,
        paths: datasets.Dataset,
        transform: Callable[[Any], torch.Tensor],
        label_ids: LabelIds | None,
        mixer: BatchMixer | None = None,
    ) -> None:
        super().__init__(len(paths), label_ids)
        self.paths = paths
        self.transform = transform
        self.mixer = mixer

    def inputs(self, row: int) -> dict[str, Any]:
        return self.inputs_of([row])[0]

    def inputs_of(self, rows: list[int]) -> list[dict[str, Any]]:
        from PIL import Image

        items = []
        for path in self.paths.data.fast_gather(np.asarray(rows)).column(0).to_pylist():
            with Image.open(path) as image:
                items.append({"pixel_values": self.transform(image.convert("RGB"))})
        return items

    def collate_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items])}

    @override
    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().collate(items)
        return self.mixer(batch) if self.mixer is not None and LABELS in batch else batch


class ImageClassificationData(ClassificationData):
    """Classify images from class folders or tables of image paths.

    Each split is a folder with one sub-folder per class (``FOLDER/CLASS/x.jpg``), a folder of unlabelled
    images (for predict), or a table with a path column and a label column.

    Images are prepared from the backbone's preprocessing (timm's data config, or the Hugging Face image
    processor's size, mean and std) and the image keys below (``finetune.data.transforms``): the train split
    through the augmentation (and MixUp/CutMix), every other split as evaluation (resize, centre crop,
    normalise), which is also what the export records.
    """

    def __init__(
        self,
        path_column: str = "path",
        image_size: int | tuple[int, int] | None = None,
        augment: str = DEFAULT_AUGMENT,
        scale: tuple[float, float] | None = None,
        hflip: float | None = None,
        color_jitter: float | None = None,
        re_prob: float = 0.0,
        crop_pct: float | None = None,
        interpolation: Interpolation | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        skip_bad_images: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            path_column: in table files, the column holding image paths (relative ones are read from the
                table's folder).
            image_size: the input size, an int (square) or [height, width]; default: the model's.
            augment: training augmentation: ``none`` (as evaluation; the default, chosen by measurement:
                see ``finetune.data.transforms.ImagePreparation``), ``light`` (crops of 75-100% of the area, flips), ``timm`` (timm's ImageNet default: crops of 8-100%, flips, colour jitter),
                ``randaugment``, ``trivialaugment``, ``autoaugment``, or a timm auto-augment string
                (``rand-m9-mstd0.5``).
            scale: the random crop's area range [min, max] in (0, 1]; default: the augmentation's.
            hflip: horizontal flip probability; default: the augmentation's (0.5).
            color_jitter: brightness/contrast/saturation jitter strength; default: the augmentation's.
            re_prob: random erasing probability.
            crop_pct: evaluation: the share of the resized image the centre crop keeps (1: none); default:
                the model's.
            interpolation: the resize filter; default: the model's.
            mixup: MixUp alpha for training batches (0: off); the loss then reads soft targets.
            cutmix: CutMix alpha for training batches (0: off); with ``mixup``, one of the two per batch.
            skip_bad_images: every image is opened and verified when its split is built (before training
                starts); unreadable, empty or truncated files are refused with their list (default), or with
                true skipped, saying how many.
        """
        super().__init__(**kwargs)
        require(
            self.targets.kind == "class" or not (mixup or cutmix),
            "data.mixup" if mixup else "data.cutmix",
            f"mixes one-class targets; {self.targets.layout_key} data takes none: set mixup and cutmix to 0",
        )
        self.path_column = path_column
        self.skip_bad_images = skip_bad_images
        self.preparation = ImagePreparation(
            image_size=image_size,
            augment=augment,
            scale=scale,
            hflip=hflip,
            color_jitter=color_jitter,
            re_prob=re_prob,
            crop_pct=crop_pct,
            interpolation=interpolation,
            mixup=mixup,
            cutmix=cutmix,
        )
        self._backbone_images: ImageConfig | None = None

    def image_config(self) -> ImageConfig:
        """How evaluation prepares images (the backbone's preprocessing with ``image_size``, ``crop_pct``
        and ``interpolation`` applied): what the task records and the export saves."""
        return self.preparation.eval_config(self._backbone_config())

    def transform(self, train: bool) -> Callable[[Any], torch.Tensor]:
        """The training transform (``train``) or the evaluation one."""
        return self.preparation.transform(self._backbone_config(), train)

    def _backbone_config(self) -> ImageConfig:
        """The backbone's own preprocessing, read once (it builds the model's skeleton or reads a file)."""
        if self._backbone_images is None:
            self._backbone_images = self.backbone_spec().image_config()
        return self._backbone_images

    def describe_preparation(self) -> str:
        """The train and evaluation transforms and the batch mixing, one line each (for the run plan)."""
        mixer = self.split_dataset("train").mixer if self.table("train") is not None else None
        lines = [
            f"train: {describe(self.transform(train=True))}",
            f"eval: {describe(self.transform(train=False))}",
        ]
        if mixer is not None:
            lines.append(f"train batches: {mixer!r}")
        return "\n".join(lines)

    def input_columns(self) -> dict[str, str]:
        return {"data.path_column": self.path_column}

    def read_path(self, path: Path, key: str) -> NamedTable:
        named = self._scan(path, key) if path.is_dir() else self._read_paths(path, key)
        return NamedTable(self._readable(named.rows, key), named.name)

    def _readable(self, rows: ArrowRows, key: str) -> ArrowRows:
        """The rows whose image opens and verifies: all of them, or RecipeError listing the bad files (with
        ``skip_bad_images``: the others, with a warning). Run when a split is read, before training."""
        if self.path_column not in rows.columns():
            return rows  # the base class reports the missing column
        bad = unreadable(column_values(rows.rows, self.path_column))
        if not bad:
            return rows
        if not self.skip_bad_images:
            shown = ", ".join(list(bad.values())[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise RecipeError(
                key,
                f"{len(bad)} images cannot be read ({shown}); remove them or set data.skip_bad_images: true",
            )
        logger.warning("%s: skipped %d unreadable images of %d", key, len(bad), len(rows))
        return rows.take(np.setdiff1d(np.arange(len(rows)), np.fromiter(bad, np.int64)))

    def _read_paths(self, path: Path, key: str) -> NamedTable:
        """A table of image paths, its relative paths read from the table's folder (resolved once, cached)."""
        rows, name = super().read_path(path, key)
        if self.path_column not in rows.columns():
            return NamedTable(rows, name)  # the base class reports the missing column
        folder = str(path.parent)
        resolved_print = fingerprint(rows.fingerprint, "image paths", self.path_column, folder)
        resolved = cached_map(
            reopened(rows.rows),
            _resolve,
            folder=self.cache / "paths",
            key=resolved_print,
            input_columns=[self.path_column],
            fn_kwargs={"column": self.path_column, "folder": folder},
            desc="image paths",
        )
        absent = [p for p in column_values(resolved, self.path_column) if not os.path.isfile(p)]
        if absent:
            raise RecipeError(
                key,
                f"{len(absent)} images listed in {name} do not exist, e.g. {absent[0]}; "
                f"relative paths are read from {folder}",
            )
        return NamedTable(ArrowRows(resolved, resolved_print, self.cache), name)

    def _scan(self, folder: Path, key: str) -> NamedTable:
        """``FOLDER/CLASS/image`` -> rows (path, label); images directly in ``FOLDER`` -> rows without labels.
        The listing is written to the cache and read back memory-mapped."""
        nested = _images(folder, "*/*")
        require(
            not nested or self.targets.kind == "class",
            key,
            f"{folder} is laid out as FOLDER/CLASS/IMAGE, one class per image; {self.targets.layout_key} data "
            "needs a table of image paths with its target columns",
        )
        if nested:
            frame = pd.DataFrame(
                {
                    self.path_column: [str(p) for p in nested],
                    self.label_column: [p.parent.name for p in nested],
                }
            )
        else:
            flat = _images(folder, "*")
            if not flat:
                extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise RecipeError(
                    key, f"{folder} has no images ({extensions}); lay it out as FOLDER/CLASS/IMAGE"
                )
            frame = pd.DataFrame({self.path_column: [str(p) for p in flat]})
        listing = fingerprint("image folder", frame)
        rows = memory_mapped(frame, self.cache / "folders", listing)
        return NamedTable(ArrowRows(rows, listing, self.cache), folder.name)

    def make_dataset(self, rows: datasets.Dataset, split: str, label_ids: LabelIds | None) -> ImageDataset:
        train = split == "train"
        mixer = batch_mixer(self.preparation, len(self.labels)) if train else None
        return ImageDataset(rows.select_columns([self.path_column]), self.transform(train), label_ids, mixer)


def unreadable(paths: Iterable[str]) -> dict[int, str]:
    """The paths PIL cannot open and verify (empty, truncated, not an image), by their position in
    ``paths``; reads each file once."""
    from PIL import Image, UnidentifiedImageError

    bad = {}
    for position, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            bad[position] = path
    return bad


def _resolve(paths: list[Any], column: str, folder: str) -> dict[str, list[str]]:
    """Batched ``map`` step: each path read from ``folder`` (absolute ones stay as they are; a missing
    one becomes the folder itself, which is not a file and so is reported absent)."""
    return {column: [os.path.join(folder, "" if p is None else str(p)) for p in paths]}


def _images(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
