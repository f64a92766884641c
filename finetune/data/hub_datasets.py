"""Hugging Face ``datasets`` as the source of a data module's splits (``data.dataset``): loaded once, and
each of our splits read from the dataset's split of the same role, with a fingerprint for the caches."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.data.arrow import fingerprint
from finetune.errors import RecipeError, first_line
from finetune.paths import is_local_path, resolve_path

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Our split names -> the split names Hugging Face datasets use.
DATASET_SPLITS = {"train": "train", "val": "validation", "test": "test"}


def load_dataset_dict(name: str, config: str | None) -> datasets.DatasetDict:
    """The Hugging Face dataset ``name`` (a hub name or local folder) in configuration ``config``;
    RecipeError (``data.dataset``) when it cannot be loaded."""
    import datasets

    source = str(resolve_path(name, "data.dataset")) if is_local_path(name) else name
    try:
        loaded = datasets.load_dataset(source, config)
    except (datasets.exceptions.DatasetsError, OSError, ConnectionError, ValueError) as error:
        raise RecipeError(
            "data.dataset",
            f"cannot load {name!r} ({first_line(error)}); give a local dataset folder or a cached dataset name",
        ) from error
    logger.info("loaded dataset %s with splits %s", name, ", ".join(loaded))
    return loaded


def dataset_split(
    loaded: datasets.DatasetDict, name: str, config: str | None, split: str
) -> tuple[datasets.Dataset, str] | None:
    """Our ``split`` of the loaded dataset ``name`` and a fingerprint of its rows (its files and their
    modification times), or None when the dataset has no split of that role."""
    part_name = DATASET_SPLITS.get(split)
    if part_name is None or part_name not in loaded:
        return None
    part = loaded[part_name]
    files = [(f["filename"], Path(f["filename"]).stat().st_mtime_ns) for f in part.cache_files]
    return part, fingerprint(name, config, part_name, files or part.data)
