"""What a table row's target is, and the checks of the columns that hold it.

The data keys choose one of three layouts (``TargetLayout.of``):

- one class per row: ``label_column`` holds its name (the default);
- several labels per row (multi-label): ``label_column`` holds them joined by ``label_separator``
  (``"toxic|obscene"``; an empty cell is a row with no label), or ``label_columns`` names one 0/1 column per
  label;
- float targets (regression): ``target_columns`` names one numeric column per target. The model learns them
  standardised by the train split's mean and standard deviation (``TargetStatistics``).

Tasks and data must agree on the layout (``check_task``): each task declares the ``target_kind`` it takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from finetune.data.labels import checked_labels, split_labels
from finetune.errors import RecipeError, require

if TYPE_CHECKING:
    import pyarrow as pa

    from finetune.data.rows import SplitRows

TargetKind = Literal["class", "multi_label", "regression"]
# The task that takes each kind of data, for the error that says which one to use.
TASK_OF_KIND = {
    "class": "finetune.ClassificationTask",
    "multi_label": "finetune.MultiLabelClassificationTask",
    "regression": "finetune.RegressionTask",
}
LAYOUT_KEYS = ("data.label_separator", "data.label_columns", "data.target_columns")


@dataclass(frozen=True)
class TargetLayout:
    """Where a row's target is and how it reads.

    Args:
        kind: ``class``, ``multi_label`` or ``regression``.
        columns: the columns holding the target: the label column, the 0/1 label columns, or the target columns.
        column_key: the recipe key naming ``columns``.
        separator: multi-label in one column: the string between a row's labels.
    """

    kind: TargetKind
    columns: tuple[str, ...]
    column_key: str
    separator: str | None = None

    @classmethod
    def of(
        cls,
        label_column: str,
        label_separator: str | None,
        label_columns: Sequence[str] | None,
        target_columns: Sequence[str] | None,
        labels: Sequence[str] | None,
    ) -> TargetLayout:
        """The layout the data keys choose; RecipeError naming the key when they contradict each other."""
        chosen = [
            key for key, value in zip(LAYOUT_KEYS, (label_separator, label_columns, target_columns)) if value
        ]
        if len(chosen) > 1:
            raise RecipeError(
                chosen[1], f"cannot be combined with {chosen[0]}; a recipe's data has one kind of target"
            )
        if label_separator is not None:
            require(
                bool(label_separator),
                "data.label_separator",
                "is empty; give the string between labels, e.g. '|'",
            )
            return cls("multi_label", (label_column,), "data.label_column", label_separator)
        for key, columns, kind in (
            ("data.label_columns", label_columns, "multi_label"),
            ("data.target_columns", target_columns, "regression"),
        ):
            if columns is not None:
                require(
                    labels is None,
                    "data.labels",
                    f"{key} names the {'labels' if kind == 'multi_label' else 'targets'}; drop data.labels",
                )
                return cls(kind, tuple(checked_labels(list(columns), key)), key)
        return cls("class", (label_column,), "data.label_column")

    @property
    def names_from_columns(self) -> bool:
        """True when the column names are the labels (0/1 label columns, target columns)."""
        return self.kind == "regression" or (self.kind == "multi_label" and self.separator is None)

    @property
    def layout_key(self) -> str | None:
        """The data key that chose this layout (None for one class per row, the default)."""
        if self.kind == "class":
            return None
        return "data.label_separator" if self.separator is not None else self.column_key

    def present(self, columns: Sequence[str]) -> bool:
        """True when a table with ``columns`` holds the targets (a predict table may not)."""
        return all(column in columns for column in self.columns)

    def label_names(self, rows: SplitRows) -> set[str]:
        """The distinct labels in ``rows`` (one class, or the labels of a multi-label column)."""
        (column,) = self.columns
        names = rows.label_names(column)
        if self.separator is None:
            return names
        return {label for text in names for label in split_labels(text, self.separator)}

    def check_values(self, rows: SplitRows, split: str, name: str) -> None:
        """RecipeError when a target cell of ``rows`` (split ``split``, file ``name``) cannot be read: a missing
        class, a 0/1 column holding anything else, a target that is not a finite number."""
        if self.kind == "class":
            (column,) = self.columns
            missing = rows.missing(column)
            require(
                missing == 0,
                f"data.{split}",
                f"{missing} rows of {name} have no {column!r} value; fill them in or drop those rows",
            )
        elif self.kind == "regression":
            for column in self.columns:
                _check_numbers(rows.column(column), column, split, name)
        elif self.separator is None:
            for column in self.columns:
                _check_binary(rows.column(column), column, split, name)

    def describe(self, labels: Sequence[str]) -> str:
        """One line for the run plan: the kind of target and where it is read from."""
        shown = ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")
        if self.kind == "class":
            return f"targets: one class per row from {self.columns[0]!r}: {len(labels)} classes ({shown})"
        if self.kind == "regression":
            return f"targets: {len(labels)} float targets ({shown}), learnt standardised by the train mean and std"
        source = f"{self.columns[0]!r} split at {self.separator!r}" if self.separator else "0/1 columns"
        return f"targets: multi-label from {source}: {len(labels)} labels ({shown})"


def check_task(layout: TargetLayout, task_kind: TargetKind, task_name: str) -> None:
    """RecipeError, naming the key to fix, unless a task taking ``task_kind`` targets can train on data of
    ``layout``: a single-label task on multi-label data, a regression task on class data, ..."""
    if layout.kind == task_kind:
        return
    if layout.layout_key is not None:
        raise RecipeError(
            layout.layout_key,
            f"makes {layout.kind.replace('_', '-')} data, which {task_name} does not train on; use "
            f"model.class_path {TASK_OF_KIND[layout.kind]}, or drop {layout.layout_key}",
        )
    needed = "data.target_columns" if task_kind == "regression" else "data.label_separator"
    what = "float target columns" if task_kind == "regression" else "several labels per row"
    also = "" if task_kind == "regression" else " (or data.label_columns)"
    raise RecipeError(
        needed,
        f"{task_name} needs {what}: set {needed}{also}, or use model.class_path {TASK_OF_KIND['class']}",
    )


@dataclass(frozen=True)
class TargetStatistics:
    """Each target's mean and standard deviation over the train split: the model learns ``(y - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, value: TargetStatistics | dict[str, Any]) -> TargetStatistics:
        """Accept a ``TargetStatistics`` or its ``plain()`` form (checkpoints)."""
        if isinstance(value, TargetStatistics):
            return value
        return cls(tuple(float(v) for v in value["mean"]), tuple(float(v) for v in value["std"]))

    def plain(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def close_to(self, other: TargetStatistics) -> bool:
        pairs = zip((*self.mean, *self.std), (*other.mean, *other.std))
        return len(self.mean) == len(other.mean) and all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in pairs
        )


def target_statistics(rows: SplitRows, columns: Sequence[str]) -> TargetStatistics:
    """The mean and (population) standard deviation of each of ``columns`` over ``rows`` (the train split);
    RecipeError for a target with one value throughout, which nothing can be learnt from (nor divided by)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    means, stds = [], []
    for column in columns:
        values = rows.column(column).cast(pa.float64())
        mean, std = pc.mean(values).as_py(), pc.stddev(values, ddof=0).as_py()
        require(
            std is not None and std > 0,
            "data.target_columns",
            f"{column!r} is {mean} in every train row; a target must vary to be learnt",
        )
        means.append(mean)
        stds.append(std)
    return TargetStatistics(tuple(means), tuple(stds))


def _check_numbers(values: pa.ChunkedArray, column: str, split: str, name: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = values.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)):
        present = values.drop_null().to_pylist()
        example = next((v for v in present if not _reads_as_number(v)), present[0] if present else None)
        raise RecipeError(
            "data.target_columns",
            f"{column!r} of {name} holds values that are not numbers (e.g. {example!r}, "
            f"row {_row_of(values, example)}); fix those rows or name numeric columns",
        )
    _check_missing(values, column, split, name)
    if pa.types.is_floating(kind):
        bad = pc.sum(pc.invert(pc.is_finite(values))).as_py() or 0
        require(
            bad == 0,
            f"data.{split}",
            f"{bad} rows of {name} have a NaN or infinite {column!r}; fix them or drop those rows",
        )


def _check_binary(values: pa.ChunkedArray, column: str, split: str, name: str) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = values.type
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
    distinct = pc.unique(values.drop_null()).to_pylist()
    # A column of text (JSON lines) may spell them "0" and "1".
    others = [v for v in distinct if (v not in (0, 1) if numeric else str(v) not in ("0", "1"))]
    if others:
        raise RecipeError(
            "data.label_columns",
            f"{column!r} of {name} holds {others[0]!r} (row {_row_of(values, others[0])}); "
            "each label column holds 0 or 1",
        )
    _check_missing(values, column, split, name)


def _check_missing(values: pa.ChunkedArray, column: str, split: str, name: str) -> None:
    missing = values.null_count
    require(
        missing == 0,
        f"data.{split}",
        f"{missing} rows of {name} have no {column!r} value; fill them in or drop those rows",
    )


def _reads_as_number(value: Any) -> bool:
    """Whether a cell of a column of text (or booleans) spells a number: the example of a bad value is one
    that does not."""
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _row_of(values: pa.ChunkedArray, value: Any) -> int:
    """The first row holding ``value`` (numbered from 0)."""
    import pyarrow.compute as pc

    return pc.index(values, value).as_py()
