"""What text and image classification data share: splits, the label list and batching of table rows.

A split's rows are a memory-mapped Arrow ``datasets.Dataset`` (texts, or image paths) behind the
``finetune.data.rows.SplitRows`` contract, so splitting and labelling are written once. A row's target is one
class, several labels (multi-label) or float targets (regression), as the data keys say
(``finetune.data.targets``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from typing_extensions import override

from finetune.data.arrow import read_arrow
from finetune.data.labels import sorted_labels
from finetune.data.rows import ArrowRows, LabelIds, RowDataset, SplitRows
from finetune.data.split_data import NamedTable, SplitData
from finetune.data.tables import table_files
from finetune.data.targets import TargetKind, TargetLayout, TargetStatistics, check_task, target_statistics
from finetune.errors import RecipeError, require
from finetune.paths import resolve_path

logger = logging.getLogger(__name__)


class ClassificationData(SplitData, ABC):
    """Splits, labels and loaders for classification; subclasses turn table rows into model inputs.

    Batches are dicts of model inputs plus ``labels`` (absent when the split has no target columns) and
    ``index`` (each row's position in its split, see ``predict_table``). ``labels`` are, by the data keys:

    - one class per row (default, ``label_column``): class ids, int64 ``(B,)``;
    - multi-label (``label_separator`` or ``label_columns``): multi-hot rows, float32 ``(B, C)``;
    - regression (``target_columns``): the targets standardised by the train split's mean and standard
      deviation (``target_statistics()``, kept in checkpoints), float32 ``(B, T)``.

    ``labels`` (the property) names the classes, the labels or the targets, in column order of the batches'
    ``labels``. ``target_kind`` says which layout it is; a task that takes another kind is refused when the
    data is set up (``finetune.data.targets.check_task``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        label_column: str = "label",
        labels: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        limit: int | None = None,
        encoding: str = "auto",
        label_separator: str | None = None,
        label_columns: list[str] | None = None,
        target_columns: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            train: training data file or folder (``pkg://package/path`` works too).
            val: validation data; default: ``val_fraction`` of ``train``.
            test: test data; default: ``test_fraction`` of ``train``.
            predict: data to predict on; default: the test split, else the validation split.
            label_column: column holding the class label.
            labels: the classes in class-index order; default: the train labels, sorted (numerically when
                they are all integers).
            val_fraction: share of ``train`` held out for validation when ``val`` is not given.
            test_fraction: share of ``train`` held out for testing when ``test`` is not given.
            limit: use a random sample of this many train rows (taken before holding out val/test).
            encoding: text encoding of table files; ``auto`` reads UTF-8 and replaces undecodable bytes.
            label_separator: multi-label data: ``label_column`` holds each row's labels joined by this string
                (``toxic|obscene``; spaces around a label are dropped; an empty cell is a row with no label).
            label_columns: multi-label data: one column per label, holding 0 or 1; the column names are
                the labels.
            target_columns: regression data: the columns holding each row's float targets; the model
                learns them standardised by the train split's mean and standard deviation.
        """
        super().__init__(
            train=train,
            val=val,
            test=test,
            predict=predict,
            labels=labels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            limit=limit,
            encoding=encoding,
            **kwargs,
        )
        self.label_column = label_column
        self.targets = TargetLayout.of(label_column, label_separator, label_columns, target_columns, labels)
        self._statistics: TargetStatistics | None = None

    # --- what subclasses provide ---------------------------------------------------------------------

    @abstractmethod
    def input_columns(self) -> dict[str, str]:
        """Columns every split must have, keyed by the recipe key that names them."""

    @abstractmethod
    def make_dataset(self, rows: Any, split: str, label_ids: LabelIds | None) -> RowDataset:
        """The dataset for one split's rows (``table(split)``); ``label_ids`` gives each row's class id."""

    def read_split(self, split: str) -> NamedTable | None:
        """The table given for ``split``, or None when the recipe gives none."""
        source = self.sources[split]
        if source is None:
            return None
        key = f"data.{split}"
        return self.read_path(resolve_path(source, key), key)

    def read_path(self, path: Path, key: str) -> NamedTable:
        """One split's table file, or folder of table files read as shards in name order, as memory-mapped
        Arrow (converted into ``cache`` on first use); subclasses accept other layouts (image folders)."""
        dataset, print_ = read_arrow(table_files(path, key), key, self.encoding, self.cache)
        return NamedTable(ArrowRows(dataset, print_, self.cache), path.name)

    # --- labels ----------------------------------------------------------------------------------------

    @property
    def target_kind(self) -> TargetKind:
        """``class``, ``multi_label`` or ``regression``: what a row's target is."""
        return self.targets.kind

    def check_task(self, kind: TargetKind, task: str) -> None:
        """RecipeError naming the key to fix unless a task (class name ``task``) taking ``kind`` targets
        can train on this data."""
        check_task(self.targets, kind, task)

    def target_statistics(self) -> TargetStatistics | None:
        """Regression: each target's mean and standard deviation over the train split (after val and test
        are held out), or as restored from a checkpoint; None without either."""
        require(
            self.targets.kind == "regression", "data.target_columns", "target statistics need target columns"
        )
        if self._statistics is None:
            rows = self.split_rows("train")
            if rows is not None:
                self._statistics = target_statistics(rows, self.targets.columns)
        return self._statistics

    @override
    def _resolve_labels(self) -> list[str]:
        """The column names (``label_columns``, ``target_columns``), else the checked train labels."""
        if self.targets.names_from_columns:
            return list(self.targets.columns)
        self.table("train")  # fills self._train_pool
        pool = self._train_pool
        found = None if pool is None else sorted_labels(self.targets.label_names(pool))
        return self._checked_labels(found)

    def _checked_labels(self, found: list[str] | None) -> list[str]:
        """The class list: ``labels`` if given (every label ``found`` in train must be in it), else ``found``."""
        if self.given_labels is None:
            if found is None:
                raise RecipeError(
                    "data.train", "no train data to read the class labels from; set data.train or data.labels"
                )
            if self.targets.kind == "multi_label":
                require(
                    bool(found),
                    "data.label_column",
                    f"{self.label_column!r} holds no label in any train row; check the column and data.label_separator",
                )
                return found
            require(
                len(found) >= 2,
                "data.label_column",
                f"{self.label_column!r} holds one class ({found[0]!r}); a classifier needs two or more: check "
                "the column, or list the classes in data.labels",
            )
            return found
        unknown = sorted(set(found or ()) - set(self.given_labels))
        if unknown:
            raise RecipeError(
                "data.labels",
                f"train labels {unknown} are not in the label list {self.given_labels}; add them or drop those rows",
            )
        return list(self.given_labels)

    def _labels_known(self) -> bool:
        """Whether the rows' targets can be read without train data (predicting from a checkpoint)."""
        if self.targets.kind == "regression":
            return self.target_statistics() is not None
        return (
            self.targets.names_from_columns
            or self._labels is not None
            or self.given_labels is not None
            or self.table("train") is not None
        )

    def _label_ids(self, split: str, rows: SplitRows) -> LabelIds | None:
        """Each row's target (class id, multi-hot row or standardised targets), or None for unlabelled rows."""
        if not self.targets.present(rows.columns()) or (split == "predict" and not self._labels_known()):
            # Predict files may be unlabelled, and predicting from a checkpoint may have no train data.
            return None
        layout = self.targets
        if layout.kind == "regression":
            statistics = self.target_statistics()
            if statistics is None:
                raise RecipeError(
                    "data.train",
                    "targets are standardised by the train split's mean and std; set data.train (as in training)",
                )
            return rows.column_targets(layout.columns, statistics.mean, statistics.std)
        if layout.names_from_columns:
            width = len(layout.columns)
            return rows.column_targets(layout.columns, [0.0] * width, [1.0] * width)
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted(layout.label_names(rows) - set(index))
        if unknown:
            origin = "are not in data.labels" if self.given_labels is not None else "do not occur in train"
            raise RecipeError(
                f"data.{split}", f"labels {unknown} {origin}; drop those rows or fix the labels"
            )
        if layout.kind == "multi_label":
            return rows.multi_hot(self.label_column, layout.separator, index)
        return rows.label_ids(self.label_column, index)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        statistics = self.target_statistics() if self.targets.kind == "regression" else None
        if statistics is not None:
            state["target_statistics"] = statistics.plain()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = [str(label) for label in state_dict["labels"]]
        if self.targets.names_from_columns:
            require(
                restored == self.labels,
                self.targets.column_key,
                f"the checkpoint has {restored} but this data names {self.labels}; name the same columns",
            )
        else:
            self._restore_labels(restored)
        if "target_statistics" in state_dict:
            self._restore_statistics(TargetStatistics.of(state_dict["target_statistics"]))

    def _restore_statistics(self, restored: TargetStatistics) -> None:
        """Take a checkpoint's target statistics; refuse them when this train split gave others (its batches
        are standardised already, and the model learnt the checkpoint's)."""
        if self._statistics is None:
            self._statistics = restored
            return
        require(
            self._statistics.close_to(restored),
            "data.train",
            f"this train split's target means/stds {self._statistics.plain()} differ from the checkpoint's "
            f"{restored.plain()}; train on the data the checkpoint was trained on",
        )

    # --- splits ------------------------------------------------------------------------------------------

    @override
    def _load(self, split: str) -> SplitRows | None:
        named = self.read_split(split)
        if named is None:
            return None
        rows = named.rows
        for key, column in self.input_columns().items():
            _require_column(rows, column, key, named.name)
        if not self.targets.present(rows.columns()):
            if split != "predict":
                for column in self.targets.columns:
                    _require_column(rows, column, self.targets.column_key, named.name)
            return rows
        self.targets.check_values(rows, split, named.name)
        return rows

    @override
    def setup(self, stage: str) -> None:
        """Check that the trainer's task takes this data's kind of target (``target_kind``), then build the
        datasets of ``stage``'s splits."""
        self._check_module()
        super().setup(stage)

    def _check_module(self) -> None:
        """The trainer's module must take this kind of target: finetune's tasks declare the kind they take
        in ``target_kind``; other modules are not checked."""
        module = None if self.trainer is None else self.trainer.lightning_module
        kind = getattr(module, "target_kind", None)
        if kind is not None:
            self.check_task(kind, type(module).__name__)

    @override
    def build_dataset(self, rows: SplitRows, split: str) -> RowDataset:
        return self.make_dataset(rows.rows, split, self._label_ids(split, rows))


def _require_column(rows: SplitRows, column: str, key: str, name: str) -> None:
    if column not in rows.columns():
        columns = ", ".join(map(str, rows.columns()))
        raise RecipeError(key, f"column {column!r} not in {name}; columns are: {columns}")
