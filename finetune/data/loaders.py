"""Loader plumbing every data module shares: the seeded epoch sampler, the one DataLoader builder, and the
base data module that holds the loader settings (seed, batch sizes, workers, backbone, cache folder)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sized
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from typing_extensions import override

from finetune.backbones.base import Backbone
from finetune.data.arrow import cache_folder
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
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        # A few thousand Python ints at a time: a list of all rows would cost ~36 bytes each.
        for start in range(0, self.size, 4096):
            yield from order[start : start + 4096].tolist()

    def __len__(self) -> int:
        return self.size


# Below this many rows a split loads in the main process: its rows are ready-made (tokenised) or few, and
# starting workers would cost more than they save.
SMALL_SPLIT = 10_000


def default_workers(processes: int = 1) -> int:
    """Loader workers per process: the CPUs this process may use, shared among the ``processes`` on this
    machine, less one for the process itself; at most 4 (tokenised rows need few)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(4, cpus // max(1, processes) - 1))


class EpochLoader(DataLoader):
    """A DataLoader over a stream (an iterable dataset with an ``epoch``) that sets the stream's epoch from
    ``epoch()`` each time it is iterated. Its workers start anew each epoch (they are not persistent), so
    they read the epoch as it is then."""

    def __init__(self, dataset: Any, epoch: Callable[[], int], **options: Any) -> None:
        super().__init__(dataset, **options)
        self.epoch_of = epoch

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch_of()
        return super().__iter__()


def make_loader(
    dataset: Any,
    batch_size: int,
    num_workers: int,
    seed: int,
    sampler: Sampler[int] | None = None,
    pin_memory: bool = False,
    epoch: Callable[[], int] | None = None,
) -> DataLoader:
    """The DataLoader every finetune data module uses; ``dataset.collate`` makes its batches.

    Workers persist across epochs; ``pin_memory`` speeds up copies to a CUDA device. A ``ResumableLoader``,
    or with ``epoch`` (for a stream, which resumes by itself) an ``EpochLoader``.
    """
    options = dict(
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=dataset.collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: creating an iterator then draws no number from the global RNG, so a
        # resumed run (which creates them at other moments) keeps the same dropout masks.
        generator=torch.Generator().manual_seed(seed),
    )
    if epoch is not None:
        return EpochLoader(dataset, epoch, persistent_workers=False, **options)
    return ResumableLoader(dataset, persistent_workers=num_workers > 0, **options)


class ResumableLoader(DataLoader):
    """A DataLoader whose next pass can start after its first ``skip`` batches, so that a run resumed from a
    checkpoint taken mid-epoch (``finetune.callbacks.Preemption``) trains on the rest of that epoch's batches,
    in the order an uninterrupted run would have. The skipped batches are drawn and dropped (their order
    depends only on the sampler's seed and epoch), so nothing else about the pass changes."""

    skip: int = 0

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        skip, self.skip = self.skip, 0
        return itertools.islice(iterator, skip, None) if skip else iterator


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
        num_workers: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            backbone: the model's backbone, which decides the preprocessing; set from ``model.backbone``.
            seed: seed for ``limit``, the held-out splits and the shuffling order.
            batch_size: training batch size.
            eval_batch_size: batch size for validation, test and predict; default: ``batch_size``.
            num_workers: data loading worker processes; 0 loads in the main process. Default: 0 for a
                split of fewer than 10,000 rows, else min(4, CPUs per process - 1).
            cache_dir: folder for the data converted to memory-mapped Arrow (tables, tokens, class ids);
                default: ``$HF_DATASETS_CACHE/finetune``. Entries are never invalidated in place: a changed
                file or setting writes new ones.
        """
        super().__init__()
        require(seed >= 0, "data.seed", f"must be 0 or more, got {seed}")
        require(batch_size > 0, "data.batch_size", f"must be 1 or more, got {batch_size}")
        require(
            eval_batch_size is None or eval_batch_size > 0,
            "data.eval_batch_size",
            f"must be 1 or more, got {eval_batch_size}",
        )
        require(
            num_workers is None or num_workers >= 0,
            "data.num_workers",
            f"must be 0 or more, got {num_workers}",
        )
        self.backbone = backbone
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = cache_dir
        self.resume_skip = 0  # batches the next train loader's first pass skips (mid-epoch resume)

    @cached_property
    def cache(self) -> Path:
        """The folder of converted and cached data (``cache_dir`` or its default)."""
        return cache_folder(self.cache_dir)

    def backbone_spec(self) -> Backbone:
        """The backbone that decides the preprocessing; RecipeError when the recipe sets none."""
        if self.backbone is None:
            raise RecipeError(
                "data.backbone", "no backbone to preprocess for; set model.backbone or data.backbone"
            )
        return Backbone.of(self.backbone)

    def train_loader(self, dataset: Any) -> DataLoader:
        """Training batches of ``batch_size``, shuffled by ``(seed, epoch)`` (a stream shuffles itself).

        Its first pass skips ``resume_skip`` batches (set by ``finetune.callbacks.Preemption`` when a run
        resumes from a checkpoint taken mid-epoch).
        """
        if isinstance(dataset, IterableDataset):
            self.resume_skip = 0  # a stream starts at the position it was given
            return self._loader(dataset, self.batch_size, None, self._current_epoch)
        loader = self._loader(dataset, self.batch_size, EpochShuffleSampler(len(dataset), self.seed))
        loader.skip, self.resume_skip = self.resume_skip, 0
        return loader

    def eval_loader(self, dataset: Any) -> DataLoader:
        """Validation, test or predict batches of ``eval_batch_size``, in row order."""
        return self._loader(dataset, self.eval_batch_size, None)

    def _current_epoch(self) -> int:
        return 0 if self.trainer is None else self.trainer.current_epoch

    def workers(self, dataset: Any) -> int:
        """``num_workers``, or by default none for a split under ``SMALL_SPLIT`` rows and otherwise
        ``default_workers`` for the processes this trainer runs on each machine."""
        if self.num_workers is not None:
            return self.num_workers
        if isinstance(dataset, Sized) and len(dataset) < SMALL_SPLIT:
            return 0
        trainer = self.trainer
        return default_workers(1 if trainer is None else trainer.num_devices)

    def _loader(
        self,
        dataset: Any,
        batch_size: int,
        sampler: Sampler[int] | None,
        epoch: Callable[[], int] | None = None,
    ) -> DataLoader:
        trainer = self.trainer
        pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return make_loader(dataset, batch_size, self.workers(dataset), self.seed, sampler, pin, epoch)


class TrainValData(LoaderDataModule):
    """A data module with train and val splits only, held as ``datasets`` (built on first access, from cached
    files): ``prepare_data`` builds them on one process per machine, then the loaders read them."""

    datasets: dict[str, Any]

    @override
    def prepare_data(self) -> None:
        """Tokenise on one process per machine first (Lightning holds the others back until it is done):
        they then find the token files in the cache."""
        self.datasets  # noqa: B018 - builds (or loads) the cached token files

    @override
    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.datasets["train"])

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # An empty list tells Lightning there is no validation.
        dataset = self.datasets["val"]
        return self.eval_loader(dataset) if len(dataset) else []
