"""Sequence-to-sequence data (summarisation, translation) for encoder-decoder models: source and target texts.

Table files (JSON lines ``{"source": ..., "target": ...}``, CSV, TSV, Parquet; a folder of them is read as
shards in name order) are converted once into memory-mapped Arrow (``finetune.data.arrow``), split, and each
split is tokenised once by a cached ``Dataset.map`` keyed by the rows, the tokenizer and the settings: a second
run with the same data and tokenizer starts without tokenising, and no step holds a Python object per row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from typing_extensions import override

from finetune.backbones.base import Backbone
from finetune.data.arrow import cached_map, fingerprint, read_arrow, reopened
from finetune.data.instructions import IGNORE, TokenRows
from finetune.data.loaders import TrainValData
from finetune.data.rows import ArrowRows
from finetune.data.splits import check_hold_out, hold_out
from finetune.data.tables import table_files
from finetune.data.tokens import Padding, TokenizerOfBackbone, gather
from finetune.errors import require
from finetune.paths import resolve_path

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class Seq2SeqRows(TokenRows):
    """Tokenised source/target pairs in a memory-mapped Arrow file. ``collate`` right-pads the sources (id
    ``pad_id``, with their attention mask) and the targets (-100), each to its own longest row."""

    def __init__(self, tokens: datasets.Dataset, pad_id: int) -> None:
        super().__init__(tokens, pad_id)
        self.sources = Padding(pad_id, side="right")
        self.targets = Padding(IGNORE, side="right", attention_mask=False)

    @override
    def collate(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self.sources([{"input_ids": item["input_ids"]} for item in items])
        labels = self.targets([{"input_ids": item["labels"]} for item in items])["input_ids"]
        return batch | {"labels": labels}


class Seq2SeqData(TokenizerOfBackbone, TrainValData):
    """Source/target text pairs for an encoder-decoder model (``finetune.tasks.seq2seq.Seq2SeqTask``).

    Batches hold ``input_ids`` and ``attention_mask`` (the sources, ``source_prefix`` first) and ``labels``
    (the target tokens, -100 on padding). ``generation_batches(n)`` gives the first ``n`` validation rows for
    generation, with their source and reference texts.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        val_fraction: float = 0.1,
        source_column: str = "source",
        target_column: str = "target",
        source_prefix: str = "",
        max_source_length: int = 512,
        max_target_length: int = 128,
        limit: int | None = None,
        encoding: str = "auto",
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        backbone: str | Backbone | None = None,
    ) -> None:
        """
        Args:
            train: a table file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``) or a folder of them
                (``pkg://package/path`` works too).
            val: a table file for validation; default: ``val_fraction`` of ``train``.
            val_fraction: share of ``train`` held out for validation when ``val`` is not given.
            source_column: column holding the input text.
            target_column: column holding the text to generate.
            source_prefix: text put before every source (T5's task prefix, e.g. ``"summarize: "``).
            max_source_length: truncate sources (prefix included) to this many tokens.
            max_target_length: truncate targets to this many tokens (the end-of-text token included).
            limit: use a random sample of this many train rows.
            encoding: text encoding of the files; ``auto`` reads UTF-8 and replaces undecodable bytes.
            seed: seed for ``limit``, the held-out split and the shuffling order.
            batch_size: training batch size.
            eval_batch_size: validation (and generation) batch size; default ``batch_size``.
            num_workers: data loading worker processes; default: 0 for fewer than 10,000 rows, else
                min(4, CPUs per process - 1).
            num_proc: processes tokenising each split (default: this one).
            cache_dir: folder for the converted tables and their tokens; default:
                ``$HF_DATASETS_CACHE/finetune``.
            backbone: the model's backbone (for its tokenizer); set from ``model.backbone``.
        """
        super().__init__(
            backbone=backbone,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
        )
        check_hold_out({"val": val_fraction}, limit)
        for key, length in (
            ("max_source_length", max_source_length),
            ("max_target_length", max_target_length),
        ):
            require(length > 1, f"data.{key}", f"must be 2 or more, got {length}")
        require(
            source_column != target_column,
            "data.target_column",
            f"{target_column!r} is also the source column; name the column that holds the targets",
        )
        require(num_proc is None or num_proc > 0, "data.num_proc", f"must be 1 or more, got {num_proc}")
        self.sources = {"train": train, "val": val}
        self.val_fraction = val_fraction
        self.columns = {"data.source_column": source_column, "data.target_column": target_column}
        self.source_prefix = source_prefix
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.limit = limit
        self.encoding = encoding
        self.num_proc = num_proc

    # --- reading ---------------------------------------------------------------------------------------

    @cached_property
    def splits(self) -> dict[str, ArrowRows]:
        """The train and val rows after ``limit`` and the held-out split, memory-mapped."""
        require(
            self.sources["train"] is not None,
            "data.train",
            "no training data; set data.train to a table file",
        )
        train = self._read("train")
        given_val = self.sources["val"] is not None
        picked = hold_out(len(train), {} if given_val else {"val": self.val_fraction}, self.seed, self.limit)
        val = self._read("val") if given_val else train.take(picked.get("val", np.zeros(0, np.int64)))
        train = train.take(picked["train"])
        logger.info("source/target pairs: train %d, val %d", len(train), len(val))
        return {"train": train, "val": val}

    def _read(self, split: str) -> ArrowRows:
        key = f"data.{split}"
        paths = table_files(resolve_path(self.sources[split], key), key)
        rows = ArrowRows(*read_arrow(paths, key, self.encoding, self.cache), self.cache)
        found = rows.columns()
        for column_key, column in self.columns.items():
            require(
                column in found,
                column_key,
                f"column {column!r} not in {paths[0].name}; its columns are: {', '.join(found)}",
            )
            missing = rows.missing(column)
            require(
                missing == 0,
                key,
                f"{missing} rows of {paths[0].name} have no {column!r}; fill or drop them",
            )
        return rows

    # --- tokenising ------------------------------------------------------------------------------------

    def _tokens(self, split: str) -> datasets.Dataset:
        rows = self.splits[split]
        columns = list(self.columns.values())
        settings = (self.source_prefix, self.max_source_length, self.max_target_length)
        key = fingerprint(rows.fingerprint, self.tokenizer_fingerprint, columns, settings, "seq2seq tokens")
        return cached_map(
            reopened(rows.rows).select_columns(columns),  # the text pages are let go once tokenised
            _tokenize_batch,
            folder=self.cache / "tokens",
            key=key,
            num_proc=self.num_proc,
            input_columns=columns,
            remove_columns=columns,
            features=_token_features(),
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "prefix": self.source_prefix,
                "max_source_length": self.max_source_length,
                "max_target_length": self.max_target_length,
            },
            desc=f"tokenizing {split}",
        )

    @cached_property
    def datasets(self) -> dict[str, Seq2SeqRows]:
        pad = self.tokenizer.pad_token_id
        require(
            pad is not None,
            "model.backbone",
            "the tokenizer has no padding token; an encoder-decoder's has one",
        )
        return {split: Seq2SeqRows(self._tokens(split).with_format(None), pad) for split in ("train", "val")}

    def generation_batches(
        self, n: int | None
    ) -> Iterator[tuple[dict[str, torch.Tensor], list[str], list[str]]]:
        """The first ``n`` validation rows (None: all) in batches of ``eval_batch_size``: the padded source
        tokens (``input_ids``, ``attention_mask``), the source texts (with the prefix) and the references."""
        tokens, rows = self.datasets["val"], self.splits["val"].rows
        count = len(tokens) if n is None else min(n, len(tokens))
        source, target = self.columns.values()
        for start in range(0, count, self.eval_batch_size):
            indices = list(range(start, min(start + self.eval_batch_size, count)))
            texts = gather(rows, indices)
            batch = tokens.sources(
                [{"input_ids": row["input_ids"]} for row in gather(tokens.tokens, indices)]
            )
            sources = [self.source_prefix + str(row[source]) for row in texts]
            yield batch, sources, [str(row[target]) for row in texts]

    def describe_data(self) -> str:
        """What the run plan shows about the data: each split's rows and where they are kept."""
        counts = ", ".join(f"{split} {len(rows):,}" for split, rows in self.splits.items())
        return (
            f"source/target pairs: {counts} (memory-mapped Arrow files in {self.cache})\n"
            f"sources: {self.columns['data.source_column']!r} with prefix {self.source_prefix!r}, "
            f"at most {self.max_source_length} tokens; targets: {self.columns['data.target_column']!r}, "
            f"at most {self.max_target_length} tokens"
        )


def _tokenize_batch(
    sources: list[Any],
    targets: list[Any],
    *,
    tokenizer: Any,
    prefix: str,
    max_source_length: int,
    max_target_length: int,
) -> dict[str, list[list[int]]]:
    """Batched ``map`` step: source ids (prefix first) and target ids, each truncated, with the tokenizer's
    special tokens (T5 and BART end both with their end-of-text token, which the model learns to stop at)."""
    source_ids = tokenizer(
        [prefix + str(text) for text in sources], truncation=True, max_length=max_source_length
    )["input_ids"]
    target_ids = tokenizer(
        text_target=[str(text) for text in targets], truncation=True, max_length=max_target_length
    )["input_ids"]
    return {"input_ids": source_ids, "labels": target_ids}


def _token_features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})
