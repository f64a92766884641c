"""Class labels: the recipe's label list, checked, and the default order of labels found in data."""

from __future__ import annotations

import re
from collections.abc import Iterable

from finetune.errors import require


def checked_labels(labels: list[str] | None, key: str = "data.labels") -> list[str] | None:
    """``labels`` as strings; RecipeError (``key``) when the list is empty or repeats a name."""
    if labels is None:
        return None
    names = [str(label) for label in labels]
    repeated = sorted({name for name in names if names.count(name) > 1})
    require(bool(names), key, "is empty; list the names or leave it unset")
    require(not repeated, key, f"lists {repeated} more than once; give each once")
    return names


def split_labels(text: str, separator: str) -> list[str]:
    """The labels of a multi-label cell: ``text`` split at ``separator``, each stripped of surrounding
    spaces, empty pieces dropped (``"a | b|"`` holds ``a`` and ``b``; an empty cell holds none)."""
    return [piece.strip() for piece in text.split(separator) if piece.strip()]


def sorted_labels(values: Iterable[str]) -> list[str]:
    """Unique labels, in numeric order when all are integers (so 2 < 10), else in string order."""
    unique = set(values)
    if all(re.fullmatch(r"[-+]?\d+", label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)
