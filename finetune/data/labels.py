"""Class labels: the recipe's label list, checked, and the default order of labels found in data."""

from __future__ import annotations

import re
from collections.abc import Iterable

from finetune.errors import require


def checked_labels(labels: list[str] | None) -> list[str] | None:
    """``labels`` as strings; RecipeError (``data.labels``) when the list is empty or repeats a class."""
    if labels is None:
        return None
    names = [str(label) for label in labels]
    repeated = sorted({name for name in names if names.count(name) > 1})
    require(bool(names), "data.labels", "is empty; list the class names or leave it unset")
    require(not repeated, "data.labels", f"lists {repeated} more than once; give each class once")
    return names


def sorted_labels(values: Iterable[str]) -> list[str]:
    """Unique labels, in numeric order when all are integers (so 2 < 10), else in string order."""
    unique = set(values)
    if all(re.fullmatch(r"[-+]?\d+", label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)
