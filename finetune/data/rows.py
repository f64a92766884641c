"""A split's rows for ``ClassificationData``, behind one small contract (``SplitRows``): ``ArrowRows`` holds
them as a memory-mapped Arrow ``datasets.Dataset`` (texts or image paths, tables of any size).

Labels are compared as text: a cell's label is ``str(value)``, and a Hugging Face ``ClassLabel`` id is its
class name (-1, unlabelled, is a missing label).

Each row's target (a class id, a multi-hot row, float targets) is computed once per split by a cached batched
``map`` into its own memory-mapped column, and read a batch at a time (``LabelIds``): no Python object per row.
``RowDataset`` is the torch dataset of a split's rows that text and image data build on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.batch import INDEX, LABELS, NOT_MODEL_INPUTS
from finetune.data.arrow import cached_map, fingerprint, reopened, write_rows
from finetune.data.labels import split_labels

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa


class SplitRows(Protocol):
    """What ``ClassificationData`` needs from a split's rows."""

    @property
    def rows(self) -> Any:
        """The rows as ``table(split)`` gives them (row ``i`` has ``index`` ``i`` in batches)."""

    def __len__(self) -> int: ...

    def columns(self) -> list[str]: ...

    def missing(self, column: str) -> int:
        """How many rows have no value in ``column``."""

    def take(self, indices: np.ndarray) -> SplitRows:
        """The rows at ``indices`` (sorted, distinct), in that order."""

    def label_names(self, column: str) -> set[str]:
        """The distinct labels (as text) in ``column``."""

    def label_ids(self, column: str, index: Mapping[str, int]) -> LabelIds:
        """Each row's class id: ``index`` of its label."""

    def multi_hot(self, column: str, separator: str, index: Mapping[str, int]) -> LabelIds:
        """Each row's labels (``column`` split at ``separator``) as a 0/1 row over ``index``."""

    def column_targets(self, columns: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> LabelIds:
        """Each row's values of ``columns`` as floats, read as ``(value - mean) / std``."""

    def column(self, column: str) -> pa.ChunkedArray:
        """All values of ``column``."""


class LabelIds(Protocol):
    """The targets of a split's rows, read a batch at a time: class ids ``(B,)`` (int), or float rows
    ``(B, W)`` (multi-hot labels, standardised targets). A numpy array is one."""

    def __len__(self) -> int: ...

    def take(self, rows: Sequence[int]) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class ArrowRows:
    """A split held as a memory-mapped ``datasets.Dataset``; ``fingerprint`` identifies its rows, and
    derived columns (class ids) are cached in ``cache``."""

    rows: datasets.Dataset
    fingerprint: str
    cache: Path

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> list[str]:
        return list(self.rows.column_names)

    def missing(self, column: str) -> int:
        import pyarrow.compute as pc

        values = self.column(column)
        missing = values.null_count
        if self._class_names(column) is not None:
            missing += pc.sum(pc.less(values, 0)).as_py() or 0
        return missing

    def take(self, indices: np.ndarray) -> ArrowRows:
        """The rows at ``indices``, kept in their own Arrow file in ``cache`` (written once)."""
        import datasets

        if len(indices) == len(self.rows):
            return self  # sorted and distinct: every row, in order
        key = fingerprint(self.fingerprint, "take", indices)
        target = self.cache / "splits" / f"{key}.arrow"
        if not target.is_file():
            write_rows(self.rows, indices, target)
        return ArrowRows(datasets.Dataset.from_file(str(target)), key, self.cache)

    def label_names(self, column: str) -> set[str]:
        return {text for text in self._texts(column).values() if text is not None}

    def label_ids(self, column: str, index: Mapping[str, int]) -> ArrowIds:
        import pyarrow as pa
        from datasets import Features, Value

        ids = {value: index[text] for value, text in self._texts(column).items()}
        key = fingerprint(self.fingerprint, "label ids", column, sorted(ids.items(), key=repr))
        encoded = cached_map(
            reopened(self.rows).select_columns([column]).with_format("arrow"),
            _encode_labels,
            folder=self.cache / "labels",
            key=key,
            input_columns=[column],
            remove_columns=[column],
            features=Features({"labels": Value("int32")}),
            fn_kwargs={"values": pa.array(list(ids)), "ids": np.array(list(ids.values()), dtype=np.int32)},
            desc="class ids",
        )
        return ArrowIds(encoded)

    def multi_hot(self, column: str, separator: str, index: Mapping[str, int]) -> ArrowTargets:
        texts = self._texts(column)
        # One 0/1 row per distinct cell (an empty cell, None, has no label); rows look theirs up.
        hots = np.zeros((len(texts), len(index)), dtype=np.float32)
        for row, text in enumerate(texts.values()):
            for label in split_labels(text or "", separator):
                hots[row, index[label]] = 1
        key = fingerprint(self.fingerprint, "multi-hot", column, separator, sorted(index.items()))
        arguments = {"values": list(texts), "hots": hots}
        return ArrowTargets(
            self._targets([column], _encode_multi_hot, key, len(index), arguments, "multi-hot labels")
        )

    def column_targets(
        self, columns: Sequence[str], mean: Sequence[float], std: Sequence[float]
    ) -> ArrowTargets:
        key = fingerprint(self.fingerprint, "column targets", list(columns))
        targets = self._targets(list(columns), _encode_columns, key, len(columns), {}, "targets")
        return ArrowTargets(targets, np.asarray(mean, np.float32), np.asarray(std, np.float32))

    def column(self, column: str) -> pa.ChunkedArray:
        """One column, read through a copy of the rows that is dropped after use (``reopened``)."""
        return reopened(self.rows).data.column(column)

    def _targets(
        self,
        columns: list[str],
        function: Any,
        key: str,
        width: int,
        arguments: dict[str, Any],
        description: str,
    ) -> datasets.Dataset:
        """``function`` of ``columns`` mapped into one cached float32 column of ``width`` values per row."""
        from datasets import Features, List, Value

        return cached_map(
            reopened(self.rows).select_columns(columns).with_format("arrow"),
            function,
            folder=self.cache / "targets",
            key=key,
            input_columns=columns,
            remove_columns=columns,
            features=Features({"labels": List(Value("float32"), length=width)}),
            fn_kwargs=arguments,
            desc=description,
        )

    def _texts(self, column: str) -> dict[Any, str | None]:
        """Each distinct raw value of ``column`` and its label text."""
        import pyarrow.compute as pc

        values = pc.unique(self.column(column)).to_pylist()
        names = self._class_names(column)
        if names is not None:
            return {v: None if v is None or v < 0 else names[v] for v in values}
        return {v: None if v is None else str(v) for v in values}

    def _class_names(self, column: str) -> list[str] | None:
        from datasets import ClassLabel

        feature = self.rows.features.get(column)
        return list(feature.names) if isinstance(feature, ClassLabel) else None


class ArrowIds:
    """Class ids in one memory-mapped int64 column (``labels``), gathered a batch at a time."""

    def __init__(self, ids: datasets.Dataset) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: Sequence[int]) -> np.ndarray:
        return self.ids.data.fast_gather(np.asarray(rows)).column("labels").to_numpy().astype(np.int64)


class ArrowTargets:
    """Float targets in one memory-mapped fixed-width column (``labels``), gathered a batch at a time as
    ``(B, W)`` float32; with ``mean`` and ``std``, read as ``(value - mean) / std`` (the cached column keeps
    the values as they are, so it serves any standardisation)."""

    def __init__(
        self, targets: datasets.Dataset, mean: np.ndarray | None = None, std: np.ndarray | None = None
    ) -> None:
        self.targets = targets
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, rows: Sequence[int]) -> np.ndarray:
        column = self.targets.data.fast_gather(np.asarray(rows)).column("labels").combine_chunks()
        values = column.flatten().to_numpy().reshape(len(rows), column.type.list_size)
        if self.mean is None:
            return values
        return ((values - self.mean) / self.std).astype(np.float32)


def _encode_labels(column: pa.ChunkedArray, values: pa.Array, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Batched ``map`` step: each row's class id, found by the position of its raw label in ``values``."""
    import pyarrow.compute as pc

    return {"labels": ids[pc.index_in(column, value_set=values).to_numpy(zero_copy_only=False)]}


def _encode_multi_hot(column: pa.ChunkedArray, values: list[Any], hots: np.ndarray) -> dict[str, np.ndarray]:
    """Batched ``map`` step: each row's 0/1 row, found by the position of its raw cell in ``values`` (the
    split's distinct cells, a missing one included: nulls match nulls)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    positions = pc.index_in(column, value_set=pa.array(values, type=column.type))
    return {"labels": hots[positions.to_numpy(zero_copy_only=False)]}


def _encode_columns(*columns: pa.ChunkedArray) -> dict[str, np.ndarray]:
    """Batched ``map`` step: the row's values of the columns, side by side, as float32."""
    return {
        "labels": np.stack([c.to_numpy(zero_copy_only=False).astype(np.float32) for c in columns], axis=1)
    }


class RowDataset(Dataset, ABC):
    """Item ``i`` is row ``i``'s model inputs plus ``index`` (``i``) and, when known, ``labels`` (a class id,
    or a row of floats: multi-hot labels, standardised targets).

    Subclasses say how rows become model inputs and how inputs are batched; ``collate`` adds the rest: batches
    carry ``index`` as int64 ``(B,)`` and ``labels`` as int64 ``(B,)`` (class ids) or float32 ``(B, W)``. The
    DataLoader fetches a batch's rows in one ``__getitems__`` call, so Arrow-backed subclasses read them in
    one gather (override ``inputs_of``).
    """

    def __init__(self, size: int, label_ids: Sequence[int] | LabelIds | None) -> None:
        self.size = size
        self.label_ids = (
            label_ids if label_ids is None or hasattr(label_ids, "take") else np.asarray(label_ids, np.int64)
        )

    @abstractmethod
    def inputs(self, row: int) -> dict[str, Any]:
        """The model inputs of one row."""

    @abstractmethod
    def collate_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Batch the model inputs of several rows."""

    def inputs_of(self, rows: list[int]) -> list[dict[str, Any]]:
        """The model inputs of several rows."""
        return [self.inputs(row) for row in rows]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        items = self.inputs_of(rows)
        labels = None if self.label_ids is None else self.label_ids.take(rows).tolist()
        for position, (item, row) in enumerate(zip(items, rows)):
            item[INDEX] = row
            if labels is not None:
                item[LABELS] = labels[position]
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = [{k: v for k, v in item.items() if k not in NOT_MODEL_INPUTS} for item in items]
        batch = self.collate_inputs(inputs)
        for key in NOT_MODEL_INPUTS:
            if key in items[0]:
                values = torch.tensor([item[key] for item in items])
                batch[key] = values.float() if values.is_floating_point() else values.long()
        return batch
