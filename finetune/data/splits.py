"""Sampling ``limit`` training rows and holding out validation/test shares of them, on row indices only."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from finetune.errors import require


def check_hold_out(fractions: Mapping[str, float], limit: int | None) -> None:
    """Fail early on recipe values ``hold_out`` cannot use: a fraction outside [0, 1), fractions adding
    up to 1 or more (reported on the last one's key), or a ``limit`` below 1."""
    for split, fraction in fractions.items():
        require(0 <= fraction < 1, f"data.{split}_fraction", f"must be in [0, 1), got {fraction}")
    if len(fractions) > 1:
        total = sum(fractions.values())
        names = " + ".join(f"{split}_fraction" for split in fractions)
        require(total < 1, f"data.{list(fractions)[-1]}_fraction", f"{names} must be below 1, got {total}")
    require(limit is None or limit > 0, "data.limit", f"must be a positive row count, got {limit}")


def hold_out(
    size: int, fractions: Mapping[str, float], seed: int, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Sample ``limit`` of ``size`` rows, then hold out each split's fraction of the sample, in order.

    Returns the sorted row indices (into ``range(size)``) of ``"train"`` and of every split in ``fractions``
    whose fraction is above 0; together they are the sampled rows, and no row is in two splits.

    - The sample is ``pandas.DataFrame.sample(n=limit, random_state=seed)``'s rows: numpy's legacy
      ``RandomState(seed)`` chooses them. No ``limit``, or one of ``size`` or more, keeps every row.
    - Each held-out split takes ``max(1, round(len(sample) * fraction))`` rows from one
      ``default_rng(seed)`` permutation of the sample, in the order of ``fractions``; train keeps the rest.

    Published results depend on exactly these rows: change the draws and they no longer reproduce.
    Raises ``RecipeError`` (``data.val_fraction``) when holding out leaves no row to train on.
    """
    sample = np.arange(size)
    if limit is not None and limit < size:
        sample = np.sort(np.random.RandomState(seed).choice(size, size=limit, replace=False))
    order = np.random.default_rng(seed).permutation(len(sample))
    splits: dict[str, np.ndarray] = {}
    start = 0
    for split, fraction in fractions.items():
        if fraction > 0:
            count = max(1, round(len(sample) * fraction))
            splits[split] = sample[np.sort(order[start : start + count])]
            start += count
    require(
        start < len(sample),
        "data.val_fraction",
        f"holding out {start} of {len(sample)} train rows leaves none to train on; lower the fractions",
    )
    return {"train": sample[np.sort(order[start:])], **splits}
