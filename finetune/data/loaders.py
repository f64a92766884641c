"""Loader plumbing every data module shares: the seeded epoch sampler, the one DataLoader builder, and the
base data module that holds the loader settings (seed, batch sizes, workers, backbone)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from finetune.backbones.base import Backbone
from finetune.errors import RecipeError, require


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(size)`` that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before each epoch, so a run resumed from a checkpoint replays the order an
    uninterrupted run would have seen.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(
    dataset: Any, batch_size: int, num_workers: int, seed: int, sampler: Sampler[int] | None = None
) -> DataLoader:
    """The DataLoader every finetune data module uses; ``dataset.collate`` makes its batches."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator then draws no number from the global RNG, so a
        # resumed run (which creates them at other moments) keeps the same dropout masks.
        generator=torch.Generator().manual_seed(seed),
    )


class LoaderDataModule(pl.LightningDataModule):
    """The loader settings every finetune data module has, checked once, and the loaders built from them.

    Classification data takes these recipe keys as they are here; ``InstructionData``, whose defaults and
    wording differ, declares them itself and passes them on.
    """

    def __init__(
        self,
        backbone: str | Backbone | None = None,
        seed: int = 42,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        """
        Args:
            backbone: the model's backbone, which decides the preprocessing; set from ``model.backbone``.
            seed: seed for ``limit``, the held-out splits and the shuffling order.
            batch_size: training batch size.
            eval_batch_size: batch size for validation, test and predict; default: ``batch_size``.
            num_workers: data loading worker processes; 0 loads in the main process.
        """
        super().__init__()
        require(seed >= 0, "data.seed", f"must be 0 or more, got {seed}")
        require(batch_size > 0, "data.batch_size", f"must be 1 or more, got {batch_size}")
        require(
            eval_batch_size is None or eval_batch_size > 0,
            "data.eval_batch_size",
            f"must be 1 or more, got {eval_batch_size}",
        )
        require(num_workers >= 0, "data.num_workers", f"must be 0 or more, got {num_workers}")
        self.backbone = backbone
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

    def backbone_spec(self) -> Backbone:
        """The backbone that decides the preprocessing; RecipeError when the recipe sets none."""
        if self.backbone is None:
            raise RecipeError(
                "data.backbone", "no backbone to preprocess for; set model.backbone or data.backbone"
            )
        return Backbone.of(self.backbone)

    def train_loader(self, dataset: Any) -> DataLoader:
        """Training batches of ``batch_size``, shuffled by ``(seed, epoch)``."""
        return make_loader(
            dataset,
            self.batch_size,
            self.num_workers,
            self.seed,
            EpochShuffleSampler(len(dataset), self.seed),
        )

    def eval_loader(self, dataset: Any) -> DataLoader:
        """Validation, test or predict batches of ``eval_batch_size``, in row order."""
        return make_loader(dataset, self.eval_batch_size, self.num_workers, self.seed)
