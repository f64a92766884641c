"""Text classification data: table files or a Hugging Face ``datasets`` dataset, tokenised for the backbone.

Rows live in memory-mapped Arrow files (``finetune.data.arrow``): a table file is converted once, each split's
tokens are written once by a cached ``Dataset.map``, and batches gather their rows from those files. Nothing
holds a Python object per row, so memory does not grow with the corpus. With ``streaming: true`` the train
split is read from its files as it trains instead (``finetune.data.streaming``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from finetune.batch import INDEX, LABELS
from finetune.data.arrow import cached_map, fingerprint, reopened
from finetune.data.classification import ClassificationData
from finetune.data.hub_datasets import DATASET_SPLITS, dataset_split, load_dataset_dict
from finetune.data.labels import sorted_labels
from finetune.data.rows import ArrowRows, LabelIds, RowDataset
from finetune.data.split_data import NamedTable
from finetune.data.streaming import StreamPosition, TableStream, check_streaming, first_columns, stream_labels
from finetune.data.tables import table_files
from finetune.data.tokens import Padding, TokenizerOfBackbone, gather
from finetune.errors import RecipeError, require
from finetune.paths import resolve_path

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


class TokenizedDataset(RowDataset):
    """Tokenised rows in a memory-mapped Arrow file; batches are padded to their longest row (dynamic
    padding). Pickles as the file's path (cheap to send to worker processes, spawned or forked)."""

    def __init__(self, tokens: datasets.Dataset, padding: Padding, label_ids: LabelIds | None) -> None:
        super().__init__(len(tokens), label_ids)
        self.tokens = tokens
        self.padding = padding

    def inputs(self, row: int) -> dict[str, Any]:
        return self.inputs_of([row])[0]

    def inputs_of(self, rows: list[int]) -> list[dict[str, Any]]:
        return gather(self.tokens, rows)

    def collate_inputs(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.padding(items)


class TextClassificationData(TokenizerOfBackbone, ClassificationData):
    """Classify texts (or text pairs) from table columns.

    Table files (CSV, TSV, JSON lines, Parquet; a folder of them is read as shards in name order) are
    converted once into memory-mapped Arrow files in ``cache_dir``, and each split is tokenised once by a
    cached ``datasets`` map keyed by the rows, the tokenizer and the settings: a second run with the same
    data and tokenizer starts without tokenising.

    With ``streaming: true`` the train split is not converted: its files are read while training, through
    a seeded shuffling buffer, each process and loader worker taking its own rows, and a checkpoint records
    the position in the stream so a resumed run continues there. A stream has no length, so
    ``trainer.max_steps`` is required (``max_epochs`` alone is refused); ``val`` and ``test`` come from their
    own files (``val_fraction``/``test_fraction``/``limit`` cannot sample a stream).
    """

    def __init__(
        self,
        text_column: str = "text",
        text_pair_column: str | None = None,
        max_length: int = 128,
        dataset: str | None = None,
        dataset_config: str | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 10_000,
        num_proc: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            text_column: column holding the text.
            text_pair_column: column holding a second text, for sentence-pair tasks (e.g. entailment).
            max_length: truncate tokenised texts to this many tokens.
            dataset: a Hugging Face ``datasets`` name or local dataset folder; its train/validation/test
                splits are used for the splits not given as files.
            dataset_config: the dataset's configuration (subset) name, if it has several.
            streaming: read the train files while training instead of converting them (for corpora too
                large to convert); needs ``trainer.max_steps``.
            shuffle_buffer: with ``streaming``, rows held in the seeded shuffling buffer (more: a better
                shuffle, more memory).
            num_proc: processes tokenising each split (default: this one; fast tokenizers also use threads).
        """
        super().__init__(**kwargs)
        require(max_length > 0, "data.max_length", f"must be 1 or more, got {max_length}")
        require(
            text_column not in (*self.targets.columns, text_pair_column),
            "data.text_column",
            f"{text_column!r} is also a label, target (or pair) column; name the column that holds the text",
        )
        require(shuffle_buffer > 0, "data.shuffle_buffer", f"must be 1 or more, got {shuffle_buffer}")
        require(num_proc is None or num_proc > 0, "data.num_proc", f"must be 1 or more, got {num_proc}")
        if streaming:
            require(
                self.targets.kind == "class",
                "data.streaming",
                f"streams one class per row; {self.targets.layout_key} data is read from converted tables: "
                "set streaming: false",
            )
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            check_streaming(self.sources, dataset, fractions, self.limit)
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.max_length = max_length
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.streaming = streaming
        self.shuffle_buffer = shuffle_buffer
        self.num_proc = num_proc
        self._stream_position = StreamPosition()

    def input_columns(self) -> dict[str, str]:
        columns = {"data.text_column": self.text_column}
        if self.text_pair_column is not None:
            columns["data.text_pair_column"] = self.text_pair_column
        return columns

    # --- reading ---------------------------------------------------------------------------------------

    @override
    def read_split(self, split: str) -> NamedTable | None:
        if self.streaming and split == "train":
            return None  # read as a stream by split_dataset
        if self.sources[split] is not None or self.dataset is None:
            return super().read_split(split)
        found = dataset_split(self._hf_dataset, self.dataset, self.dataset_config, split)
        if found is None:
            return super().read_split(split)
        part, print_ = found
        return NamedTable(ArrowRows(part, print_, self.cache), f"{self.dataset}[{DATASET_SPLITS[split]}]")

    @cached_property
    def _hf_dataset(self) -> Any:
        """The ``datasets.DatasetDict`` named by ``dataset``, loaded once."""
        return load_dataset_dict(self.dataset, self.dataset_config)

    # --- tokenising ------------------------------------------------------------------------------------

    def _truncation(self) -> int:
        # Never truncate beyond what the model accepts; tokenizers without a limit report a huge number.
        limit = self.tokenizer.model_max_length
        if self.max_length > limit:
            logger.warning(
                "data.max_length %d is above the model's limit; texts are cut at %d", self.max_length, limit
            )
        return min(self.max_length, limit)

    @override
    def make_dataset(self, rows: Any, split: str, label_ids: LabelIds | None) -> TokenizedDataset:
        split_rows = self.split_rows(split)
        columns = [self.text_column] + ([self.text_pair_column] if self.text_pair_column else [])
        key = fingerprint(split_rows.fingerprint, self.tokenizer_fingerprint, columns, self._truncation())
        tokens = cached_map(
            reopened(rows).select_columns(columns),  # the text pages are let go once tokenised
            _encode,
            folder=self.cache / "tokens",
            key=key,
            num_proc=self.num_proc,
            input_columns=columns,
            remove_columns=columns,
            features=self._token_features(),
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self._truncation()},
            desc=f"tokenizing {split}",
        )
        return TokenizedDataset(tokens.with_format(None), Padding.of(self.tokenizer), label_ids)

    def _token_features(self) -> Any:
        """The stored token columns, as narrow as the vocabulary allows (batches are int64 anyway)."""
        from datasets import Features, List, Value

        pair = "x" if self.text_pair_column is not None else None
        names = [name for name in self.tokenizer("x", pair) if name != "attention_mask"]
        types = {"input_ids": "uint16" if len(self.tokenizer) <= 2**16 else "int32", "token_type_ids": "int8"}
        return Features({name: List(Value(types.get(name, "int32"))) for name in names})

    def describe_data(self) -> str:
        """What the run plan shows about the data: each split's rows and where they are kept, or the
        stream and how far the run reads it; a line each."""
        sizes = {split: self.split_rows(split) for split in ("train", "val", "test")}
        counts = ", ".join(f"{split} {len(rows):,}" for split, rows in sizes.items() if rows is not None)
        workers = self.workers(self.split_dataset("train"))
        lines = [f"rows: {counts or 'none'} (memory-mapped Arrow files in {self.cache})"]
        if self.targets.kind != "class":
            lines.append(self.targets.describe(self.labels))
        if self.streaming:
            lines[0] = lines[0].replace("rows: ", "rows besides train: ", 1)
            files = self._train_files()
            lines.append(
                f"train: streamed from {len(files)} file(s), rows unknown; a shuffling buffer of "
                f"{self.shuffle_buffer:,} rows; the position is saved in checkpoints"
            )
            trainer = self.trainer
            if trainer is not None and trainer.max_steps > 0:
                per_step = self.batch_size * trainer.accumulate_grad_batches * trainer.world_size
                lines.append(
                    f"the run ends at trainer.max_steps = {trainer.max_steps:,} optimizer steps "
                    f"({trainer.max_steps * per_step:,} rows at {per_step:,} a step)"
                )
        lines.append(f"loader workers per process: {workers}")
        return "\n".join(lines)

    # --- streaming -------------------------------------------------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        if self.streaming and stage == "fit" and self.trainer is not None:
            require(
                self.trainer.max_steps is not None and self.trainer.max_steps > 0,
                "trainer.max_steps",
                "streaming data (data.streaming: true) has no length; set trainer.max_steps "
                "(trainer.max_epochs alone cannot end or schedule the run)",
            )
        super().setup(stage)

    @override
    def _resolve_labels(self) -> list[str]:
        if not self.streaming or self.given_labels is not None:
            return super()._resolve_labels()
        logger.info("reading the train labels from the stream (one pass); set data.labels to skip it")
        found = stream_labels(self._train_files(), "data.train", self.encoding, self.label_column)
        return self._checked_labels(sorted_labels(found))

    def _train_files(self) -> list[Path]:
        return table_files(resolve_path(self.sources["train"], "data.train"), "data.train")

    @override
    def split_dataset(self, split: str) -> RowDataset | TableStream:
        """As for every split; with ``streaming``, a new ``TableStream`` of the train files that starts
        where the last training batch left off (a restored checkpoint's position: its epoch skips the batches
        already taken, when the loader reads that epoch)."""
        if not (self.streaming and split == "train"):
            return super().split_dataset(split)
        files = self._train_files()
        columns = first_columns(files, "data.train", self.encoding)
        needed = [*self.input_columns().values(), self.label_column]
        for key, column in {**self.input_columns(), "data.label_column": self.label_column}.items():
            require(
                column in columns,
                key,
                f"column {column!r} not in {files[0].name}; columns are: {', '.join(columns)}",
            )
        trainer = self.trainer
        return TableStream(
            files,
            "data.train",
            self.encoding,
            needed,
            StreamBatches(
                self.tokenizer,
                Padding.of(self.tokenizer),
                self.text_column,
                self.text_pair_column,
                self.label_column,
                {label: i for i, label in enumerate(self.labels)},
                self._truncation(),
            ),
            seed=self.seed,
            buffer=self.shuffle_buffer,
            batch_size=self.batch_size,
            rank=0 if trainer is None else trainer.global_rank,
            world_size=1 if trainer is None else trainer.world_size,
            start=self._stream_position,
        )

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches taken in this epoch: the stream position a checkpoint records."""
        trainer = self.trainer
        if self.streaming and trainer is not None and trainer.training:
            self._stream_position = self._stream_position.advanced(trainer.current_epoch)
        return batch

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.streaming:
            state["stream"] = {"epoch": self._stream_position.epoch, "batches": self._stream_position.batches}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.streaming and "stream" in state_dict:
            self._stream_position = StreamPosition(**state_dict["stream"])


@dataclass(frozen=True)
class StreamBatches:
    """Streamed rows to a batch: their texts tokenised and padded, their labels looked up (``collate`` of
    the train stream; runs in the loader workers)."""

    tokenizer: Any
    padding: Padding
    text_column: str
    text_pair_column: str | None
    label_column: str
    label_index: dict[str, int]
    max_length: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = None if self.text_pair_column is None else [item[self.text_pair_column] for item in items]
        encoded = _encode(
            [item[self.text_column] for item in items],
            pairs,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
        )
        batch = self.padding([dict(zip(encoded, values)) for values in zip(*encoded.values())])
        batch[INDEX] = torch.tensor([item[INDEX] for item in items], dtype=torch.long)
        batch[LABELS] = torch.tensor([self._label_id(item) for item in items], dtype=torch.long)
        return batch

    def _label_id(self, item: dict[str, Any]) -> int:
        label = item[self.label_column]
        if label is None or str(label) not in self.label_index:
            raise RecipeError(
                "data.train",
                f"streamed row {item[INDEX]} has label {label!r}, not one of {list(self.label_index)}; "
                "fix data.labels or the row",
            )
        return self.label_index[str(label)]


def _encode(texts: list[Any], pairs: list[Any] | None = None, *, tokenizer: Any, max_length: int) -> dict:
    """Batched ``map`` step: the token columns of a batch of texts (the attention mask is made per batch)."""
    encodings = tokenizer(
        _strings(texts), None if pairs is None else _strings(pairs), truncation=True, max_length=max_length
    )
    return {name: values for name, values in encodings.items() if name != "attention_mask"}


def _strings(values: list[Any]) -> list[str]:
    # Empty cells are missing values; they are empty texts, not missing rows.
    return ["" if value is None else str(value) for value in values]
