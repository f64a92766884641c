"""What finetune's labelled data modules share: four splits (given as files, or held out of train), a label
list read from the train rows and kept in checkpoints, and the Lightning hooks that build their loaders.

``ClassificationData`` (tables of texts or image paths) and ``TokenTaggingData`` (tagged sentences) are
both ``SplitData``: they say how a split is read (``_load``), what the labels are (``_resolve_labels``) and
how rows become a dataset (``build_dataset``); everything else is here, once.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from finetune.data.labels import checked_labels
from finetune.data.loaders import LoaderDataModule
from finetune.data.rows import SplitRows
from finetune.data.splits import check_hold_out, hold_out
from finetune.errors import RecipeError

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
MISSING_SPLIT_FIX = {
    "train": "set data.train",
    "val": "set data.val, or data.val_fraction above 0 with data.train",
    "test": "set data.test, or data.test_fraction above 0 with data.train",
    "predict": "set data.predict (or data.test / data.val)",
}


class NamedTable(NamedTuple):
    """A split's rows and the name used for it in error messages (usually the file name)."""

    rows: SplitRows
    name: str


class SplitData(LoaderDataModule, ABC):
    """Splits and labels for data modules whose rows are memory-mapped Arrow (``SplitRows``).

    ``train``/``val``/``test``/``predict`` are read as given (``_load``); a missing ``val`` or ``test`` is
    held out of ``train`` (``val_fraction``, ``test_fraction``, after sampling ``limit`` rows, by ``seed``);
    a missing ``predict`` falls back to test, then validation. ``labels`` (the property) is ``labels`` when
    given, else read from all train rows before holding out (``_resolve_labels``), saved in checkpoints and
    written as ``labels.json``. Row ``i`` of a split is row ``i`` of ``table(split)`` and has ``index`` ``i``
    in batches.
    """

    # How rows and labels are named in logs and messages ("sentences" and "tags" for tagging data).
    row_noun: ClassVar[str] = "data rows"
    label_noun: ClassVar[str] = "labels"

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        labels: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        limit: int | None = None,
        encoding: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_hold_out({"val": val_fraction, "test": test_fraction}, limit)
        self.sources = {"train": train, "val": val, "test": test, "predict": predict}
        self.given_labels = checked_labels(labels)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.limit = limit
        self.encoding = encoding
        self._labels: list[str] | None = None
        self._tables: dict[str, SplitRows | None] = {}
        # The train rows before val/test are held out: the label list comes from all of them, so a label
        # whose few rows all land in val is still a label.
        self._train_pool: SplitRows | None = None
        self._datasets: dict[str, Dataset] = {}

    # --- what subclasses provide ---------------------------------------------------------------------

    @abstractmethod
    def _load(self, split: str) -> SplitRows | None:
        """The rows given for ``split`` (checked), or None when the recipe gives none."""

    @abstractmethod
    def _resolve_labels(self) -> list[str]:
        """The label list when it is first asked for (``self._train_pool`` holds the train rows)."""

    @abstractmethod
    def build_dataset(self, rows: SplitRows, split: str) -> Dataset:
        """The dataset of one split's rows."""

    # --- labels ----------------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        """The labels in id order: ``labels`` if given, else those of all train rows (before holding out)."""
        if self._labels is None:
            self._labels = self._resolve_labels()
        return list(self._labels)

    def save_labels(self, directory: Path) -> Path:
        """Write ``labels.json`` (a JSON list in id order) into ``directory``; return its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "labels.json"
        path.write_text(json.dumps(self.labels, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore_labels([str(label) for label in state_dict["labels"]])

    def _restore_labels(self, restored: list[str]) -> None:
        """Take a checkpoint's labels; refuse them when this data already gave others."""
        if self._labels is not None and self._labels != restored:
            raise RecipeError(
                "data.labels",
                f"the checkpoint has {self.label_noun} {restored} but this data gives {self._labels}; "
                "set data.labels to match",
            )
        self.given_labels = restored

    # --- splits ------------------------------------------------------------------------------------------

    def split_rows(self, split: str) -> SplitRows | None:
        """``split``'s rows behind the ``SplitRows`` contract, or None when there are none."""
        if split not in self._tables:
            self._tables.update(self._predict_split() if split == "predict" else self._fit_splits())
        return self._tables[split]

    def table(self, split: str) -> datasets.Dataset | None:
        """The rows of ``split`` as a memory-mapped ``datasets.Dataset`` (row ``i`` has ``index`` ``i`` in
        batches), or None when there are none."""
        rows = self.split_rows(split)
        return None if rows is None else rows.rows

    def predict_table(self) -> datasets.Dataset:
        """The rows of the predict split, in predict-loader order; join predictions on ``index``."""
        rows = self.table("predict")
        if rows is None:
            raise RecipeError("data.predict", f"no data to predict on; {MISSING_SPLIT_FIX['predict']}")
        return rows

    def _fit_splits(self) -> dict[str, SplitRows | None]:
        """train/val/test: read the given ones, then sample train and hold out the missing ones from it."""
        splits = {split: self._load(split) for split in ("train", "val", "test")}
        train = splits["train"]
        if train is not None:
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            missing = {split: fraction for split, fraction in fractions.items() if splits[split] is None}
            picked = hold_out(len(train), missing, self.seed, self.limit)
            self._train_pool = train.take(np.sort(np.concatenate(list(picked.values()))))
            splits.update({split: train.take(indices) for split, indices in picked.items()})
        logger.info(
            "%s: %s", self.row_noun, ", ".join(f"{s} {0 if t is None else len(t)}" for s, t in splits.items())
        )
        return splits

    def _predict_split(self) -> dict[str, SplitRows | None]:
        rows = self._load("predict")
        if rows is None:
            named = [(name, self.split_rows(name)) for name in ("test", "val")]
            name, rows = next(((n, t) for n, t in named if t is not None), (None, None))
            if name is not None:
                logger.warning("no data.predict: predicting on the %s split", name)
        return {"predict": rows}

    def split_dataset(self, split: str) -> Dataset:
        """The (cached) dataset of ``split``; RecipeError when the recipe gives no data for it."""
        if split not in self._datasets:
            rows = self.split_rows(split)
            if rows is None:
                raise RecipeError(f"data.{split}", f"no {split} data; {MISSING_SPLIT_FIX[split]}")
            self._datasets[split] = self.build_dataset(rows, split)
        return self._datasets[split]

    # --- Lightning hooks ------------------------------------------------------------------------------

    @override
    def prepare_data(self) -> None:
        """Set up the trainer's stage on one process per machine first (Lightning holds the others back
        until it is done): they then find the converted and tokenised files in the cache."""
        if self.trainer is not None:
            self.setup(self.trainer.state.fn.value)

    @override
    def setup(self, stage: str) -> None:
        """Build the datasets of ``stage``'s splits (validation is optional when fitting)."""
        for split in STAGE_SPLITS[stage]:
            optional = stage == "fit" and split == "val"
            if not (optional and self.split_rows(split) is None):
                self.split_dataset(split)

    @override
    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.split_dataset("train"))

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # An empty list tells Lightning there is no validation (val_fraction 0 and no data.val).
        return [] if self.table("val") is None else self.eval_loader(self.split_dataset("val"))

    @override
    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.split_dataset("test"))

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.split_dataset("predict"))
