"""Streaming table files: rows read while training, never converted to Arrow nor held in memory.

A ``TableStream`` reads its files (in an order shuffled per epoch) chunk by chunk, passes the rows through a
seeded shuffling buffer, and deals them out: of every ``processes x workers`` consecutive rows, each consumer
(one loader worker of one process) takes one, and an incomplete last group is dropped. So every process gets
the same number of rows (DDP steps in lockstep), no row is read twice in an epoch, and every consumer sees the
same order, which depends only on ``(seed, epoch)``.

Resuming: the data module counts the training batches its process has taken in the current epoch
(``StreamPosition``) and saves that count in checkpoints; a stream started at a position skips the rows those
batches held, so a resumed run continues with the next row an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from finetune.batch import INDEX
from finetune.data.tables import TableChunks, warn_replaced
from finetune.errors import RecipeError, require

# A streamed row's ``index``: its row number in its file, plus the file's number (in name order) times this.
FILE_STRIDE = 1 << 40
DRAWS = 4096  # random numbers drawn at a time by the shuffling buffer


@dataclass(frozen=True)
class StreamPosition:
    """Where a process stands in the stream: the epoch, and the training batches it took in that epoch."""

    epoch: int = 0
    batches: int = 0

    def advanced(self, epoch: int) -> StreamPosition:
        """The position after one more training batch of ``epoch``."""
        return StreamPosition(epoch, self.batches + 1 if epoch == self.epoch else 1)


def check_streaming(
    sources: Mapping[str, str | None], dataset: str | None, fractions: Mapping[str, float], limit: int | None
) -> None:
    """Refuse, at load, what a stream cannot do: hold rows out, sample ``limit`` rows, or stream a Hugging
    Face dataset (already memory-mapped Arrow: leave ``streaming`` off)."""
    require(sources["train"] is not None, "data.train", "streaming needs train files; set data.train")
    require(
        dataset is None,
        "data.streaming",
        "streams table files (data.train); a Hugging Face dataset is memory-mapped already, leave streaming off",
    )
    for split, fraction in fractions.items():
        require(
            fraction == 0 or sources[split] is not None,
            f"data.{split}_fraction",
            f"a stream cannot hold rows out; give data.{split}, or set data.{split}_fraction: 0",
        )
    require(
        limit is None, "data.limit", "cannot sample a stream; leave it unset (trainer.max_steps ends the run)"
    )


def stream_labels(files: list[Path], key: str, encoding: str, column: str) -> set[str]:
    """The distinct labels of ``column`` in ``files`` (one pass over that column); RecipeError when a row
    has none."""
    labels: set[str] = set()
    for path in files:
        for chunk in TableChunks(path, key, encoding, columns=[column]):
            missing = int(chunk[column].isna().sum())
            require(
                missing == 0,
                key,
                f"{path.name} has rows without a {column!r} value; fill them in or drop those rows",
            )
            labels.update(chunk[column].astype(str).unique())
    return labels


def first_columns(files: list[Path], key: str, encoding: str) -> list[str]:
    """The columns of the first file (read from its first chunk)."""
    chunk = next(iter(TableChunks(files[0], key, encoding, rows=100)), None)
    if chunk is None:
        raise RecipeError(
            key, f"{files[0].name} has no rows; give a table with a header and at least one row"
        )
    return [str(column) for column in chunk.columns]


class TableStream(torch.utils.data.IterableDataset):
    """The rows of ``files`` (``columns`` of them, plus ``index``), shuffled and dealt out as the module
    docstring says; ``collate`` turns a list of them into a batch.

    An iteration reads epoch ``epoch`` (set by the ``EpochLoader`` from the trainer); in epoch
    ``start.epoch`` the first ``start.batches`` batches of this process are skipped.
    """

    def __init__(
        self,
        files: list[Path],
        key: str,
        encoding: str,
        columns: list[str],
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        seed: int,
        buffer: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start: StreamPosition = StreamPosition(),
    ) -> None:
        self.files = files
        self.key = key
        self.encoding = encoding
        self.columns = columns
        self.collate = collate
        self.seed = seed
        self.buffer = buffer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.epoch = start.epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        consumers = self.world_size * workers
        me = self.rank * workers + worker
        epoch = self.epoch
        skip = self._skipped_rows(epoch, worker, workers)
        taken = 0
        mine: dict[str, Any] = {}
        for position, row in enumerate(self.shuffled(epoch, quiet=me != 0)):
            if position % consumers == me:
                mine = row
            if position % consumers == consumers - 1:  # a complete group: each consumer has its row
                if taken >= skip:
                    yield mine
                taken += 1

    def shuffled(self, epoch: int, quiet: bool = False) -> Iterator[dict[str, Any]]:
        """Every row of the epoch in its shuffled order (what all consumers deal from)."""
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(len(self.files))
        rows = (row for number in order for row in self._rows(int(number), quiet))
        return shuffle_buffer(rows, self.buffer, generator)

    def _skipped_rows(self, epoch: int, worker: int, workers: int) -> int:
        """Rows this consumer skips: those of the batches it made before ``start`` (the loader takes batch
        ``k`` of an epoch from worker ``k % workers``)."""
        if epoch != self.start.epoch:
            return 0
        batches = self.start.batches // workers + (1 if worker < self.start.batches % workers else 0)
        return batches * self.batch_size

    def _rows(self, number: int, quiet: bool) -> Iterator[dict[str, Any]]:
        path = self.files[number]
        chunks = TableChunks(path, self.key, self.encoding, columns=self.columns)
        row = number * FILE_STRIDE
        for chunk in chunks:
            for record in _records(chunk):
                record[INDEX] = row
                row += 1
                yield record
        if not quiet:
            warn_replaced(path.name, chunks.replaced)


def shuffle_buffer(items: Iterator[Any], size: int, generator: np.random.Generator) -> Iterator[Any]:
    """``items`` shuffled through a buffer of ``size``: each new item replaces a random one, which is
    yielded; what is left at the end comes out in a random order. Deterministic for a seeded ``generator``."""
    buffer: list[Any] = []
    draws = iter(())
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = next(draws, None)
        if slot is None:
            draws = iter(generator.integers(0, size, DRAWS).tolist())
            slot = next(draws)
        yield buffer[slot]
        buffer[slot] = item
    generator.shuffle(buffer)
    yield from buffer


def _records(chunk: pd.DataFrame) -> list[dict[str, Any]]:
    """A chunk's rows as dicts, missing values as None."""
    return chunk.astype(object).where(chunk.notna(), None).to_dict("records")
