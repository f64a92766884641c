"""Token tagging data (named entities, chunks, parts of speech): sentences of words with one tag per word,
tokenised for a Hugging Face encoder and aligned to its sub-tokens.

Sentences come from CoNLL-style files, JSON lines / Parquet tables or a Hugging Face dataset and are kept in
memory-mapped Arrow files (``finetune.data.arrow``), in two columns: ``tokens`` (the words) and ``tags``
(absent for unlabelled predict data; reading: ``finetune.data.sentences``). Each split is tokenised once by a
cached ``Dataset.map`` (alignment and batches: ``finetune.data.word_tokens``), and batches gather their rows
from those files, so memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

from finetune.batch import LABELS
from finetune.data.arrow import cached_map, fingerprint, read_arrow, reopened
from finetune.data.hub_datasets import DATASET_SPLITS, dataset_split, load_dataset_dict
from finetune.data.rows import ArrowRows
from finetune.data.sentences import (
    CONLL_FORMATS,
    TAGS,
    TOKENS,
    ConllChunks,
    sentence_files,
    standard_sentences,
    tag_names,
)
from finetune.data.split_data import NamedTable, SplitData
from finetune.data.tokens import Padding, TokenizerOfBackbone
from finetune.data.word_tokens import IGNORE, UNSEEN, WORD_IDS, TaggedDataset, encode_words, warn_unseen
from finetune.errors import require
from finetune.paths import resolve_path

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

OUTSIDE = "O"  # the tag of words outside every entity: first in the default tag order


class TokenTaggingData(TokenizerOfBackbone, SplitData):
    """Tag every word of a sentence (named entities in IOB2: ``B-PER``, ``I-PER``, ``O`` ...).

    Sources, per split (``train``/``val``/``test``/``predict``: a file, or a folder of files of one format
    read in name order):

    - CoNLL files (``.conll``, ``.iob``, ``.txt``): one token per line, its tag in the last
      whitespace-separated column (columns in between are ignored), a blank line between sentences,
      ``-DOCSTART-`` lines skipped. Predict files may hold the tokens alone.
    - JSON lines / JSON / Parquet tables with a list of words (``tokens_column``) and a list of tags
      (``tags_column``) per row.
    - a Hugging Face dataset (``dataset``) for the splits not given as files (its ``train``,
      ``validation`` and ``test``); integer tags with a ``ClassLabel`` feature are read as its names.

    The tag list is ``labels`` when given (every train tag must be in it), else the train tags with ``O``
    first, then sorted; checkpoints keep it (``state_dict``).

    Alignment: words are tokenised with ``is_split_into_words=True`` (a fast tokenizer; byte-level BPE ones,
    RoBERTa's, with the space before each word that running text has), truncated to ``max_length`` tokens. The first sub-token of each word carries the word's tag id; its other sub-tokens,
    special tokens and padding carry -100 (no loss, not scored). Words left without a token (cut by
    ``max_length``, or empty once tokenised) are neither trained on nor scored, and a warning counts them.

    Batches: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them),
    padded to the batch's longest row; ``labels`` (token tag ids, padded with -100; train/val/test); ``index``
    (each row's position in its split). Predict batches carry ``word_ids`` instead of ``labels``: each
    token's word index (-1 for special tokens and padding), padded to the truncation length rather than
    the batch's, so per-word outputs have one width in every batch.
    """

    row_noun = "sentences"
    label_noun = "tags"

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        tokens_column: str = "tokens",
        tags_column: str = "tags",
        labels: list[str] | None = None,
        max_length: int = 128,
        dataset: str | None = None,
        dataset_config: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        limit: int | None = None,
        encoding: str = "auto",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            train: training sentences: a CoNLL file (``.conll``/``.iob``/``.txt``), a JSON lines, JSON or
                Parquet table, or a folder of such files (``pkg://package/path`` works too).
            val: validation sentences; default: ``val_fraction`` of ``train``.
            test: test sentences; default: ``test_fraction`` of ``train``.
            predict: sentences to tag (their tags may be missing); default: the test split, else validation.
            tokens_column: tables and datasets: the column holding each sentence's list of words.
            tags_column: tables and datasets: the column holding each sentence's list of tags (names, or
                ``ClassLabel`` ids in a Hugging Face dataset).
            labels: the tags in id order; default: the train tags, ``O`` first, then sorted.
            max_length: truncate tokenised sentences to this many tokens (special tokens included).
            dataset: a Hugging Face ``datasets`` name or local dataset folder; its train/validation/test
                splits are used for the splits not given as files.
            dataset_config: the dataset's configuration (subset) name, if it has several.
            val_fraction: share of ``train`` held out for validation when ``val`` is not given.
            test_fraction: share of ``train`` held out for testing when ``test`` is not given.
            limit: use a random sample of this many train sentences (taken before holding out val/test).
            encoding: text encoding of CoNLL and JSON files; ``auto`` reads UTF-8 and replaces undecodable
                bytes.
            **kwargs: the loader settings of ``LoaderDataModule`` (``batch_size``, ``seed``, ``cache_dir`` ...).
        """
        super().__init__(
            train=train,
            val=val,
            test=test,
            predict=predict,
            labels=labels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            limit=limit,
            encoding=encoding,
            **kwargs,
        )
        require(max_length > 2, "data.max_length", f"must be 3 or more (room for a word), got {max_length}")
        require(
            tokens_column != tags_column,
            "data.tags_column",
            f"{tags_column!r} is also data.tokens_column; name the column that holds the tags",
        )
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.max_length = max_length
        self.dataset = dataset
        self.dataset_config = dataset_config

    # --- the tokenizer ------------------------------------------------------------------------------------

    @cached_property
    def tokenizer(self) -> Any:
        """The backbone's fast tokenizer, able to take sentences split into words."""
        backbone = self.backbone_spec()
        require(
            backbone.family == "hf",
            "model.backbone",
            f"{backbone.name} is not a Hugging Face model; token tagging needs a text encoder (BERT, RoBERTa ...)",
        )
        tokenizer = backbone.tokenizer()
        require(
            tokenizer.is_fast,
            "model.backbone",
            f"{backbone.name} has no fast tokenizer, which maps sub-tokens back to words; use a model that has one",
        )
        if getattr(tokenizer, "add_prefix_space", None) is False:
            # Byte-level BPE (RoBERTa, GPT-2) takes words only when it adds the space before each itself.
            tokenizer = type(tokenizer).from_pretrained(
                tokenizer.name_or_path, add_prefix_space=True, revision=backbone.revision
            )
        return tokenizer

    def _truncation(self) -> int:
        # Never beyond what the model accepts; tokenizers without a limit report a huge number.
        limit = self.tokenizer.model_max_length
        if self.max_length > limit:
            logger.warning(
                "data.max_length %d is above the model's limit; sentences are cut at %d",
                self.max_length,
                limit,
            )
        return min(self.max_length, limit)

    # --- reading ------------------------------------------------------------------------------------------

    def read_split(self, split: str) -> NamedTable | None:
        """The sentences given for ``split`` (files, else the dataset's split), or None when there are none."""
        source = self.sources[split]
        if source is not None:
            key = f"data.{split}"
            return self._read_files(resolve_path(source, key), key)
        if self.dataset is None:
            return None
        found = dataset_split(self._hf_dataset, self.dataset, self.dataset_config, split)
        if found is None:
            return None
        part, print_ = found
        return self._standard(part, print_, "data.dataset", f"{self.dataset}[{DATASET_SPLITS[split]}]")

    def _standard(self, rows: datasets.Dataset, print_: str, key: str, name: str) -> NamedTable:
        columns = {"data.tokens_column": self.tokens_column, "data.tags_column": self.tags_column}
        return NamedTable(standard_sentences(rows, print_, key, name, columns, self.cache), name)

    def _read_files(self, path: Path, key: str) -> NamedTable:
        files = sentence_files(path, key)
        if files[0].suffix.lower() in CONLL_FORMATS:
            rows, print_ = read_arrow(files, key, self.encoding, self.cache, reader=ConllChunks)
            return NamedTable(ArrowRows(rows, print_, self.cache), path.name)
        rows, print_ = read_arrow(files, key, self.encoding, self.cache)
        return self._standard(rows, print_, key, path.name)

    @cached_property
    def _hf_dataset(self) -> Any:
        """The ``datasets.DatasetDict`` named by ``dataset``, loaded once."""
        return load_dataset_dict(self.dataset, self.dataset_config)

    # --- tags ---------------------------------------------------------------------------------------------

    @override
    def _resolve_labels(self) -> list[str]:
        """``labels`` if given (every train tag must be in it), else the train tags, ``O`` first."""
        self.split_rows("train")  # fills self._train_pool
        found = None if self._train_pool is None else tag_names(self._train_pool)
        if self.given_labels is not None:
            unknown = sorted((found or set()) - set(self.given_labels))
            require(
                not unknown,
                "data.labels",
                f"train tags {unknown} are not in the tag list {self.given_labels}; add them or fix those sentences",
            )
            return list(self.given_labels)
        require(
            found is not None,
            "data.train",
            "no train sentences to read the tags from; set data.train (or data.dataset) or data.labels",
        )
        require(
            len(found) >= 2,
            "data.train",
            f"every train token has the tag {next(iter(found))!r}; check the tags (the last column of CoNLL "
            "lines, data.tags_column of tables)",
        )
        return sorted(found, key=lambda tag: (tag != OUTSIDE, tag))

    def _tag_ids(self, rows: ArrowRows, split: str) -> dict[str, int]:
        index = {tag: i for i, tag in enumerate(self.labels)}
        unknown = sorted(tag_names(rows) - set(index))
        origin = "are not in data.labels" if self.given_labels is not None else "do not occur in train"
        require(not unknown, f"data.{split}", f"tags {unknown} {origin}; fix those sentences or the tag list")
        return index

    @override
    def _load(self, split: str) -> ArrowRows | None:
        named = self.read_split(split)
        if named is None:
            return None
        require(
            split == "predict" or TAGS in named.rows.columns(),
            f"data.{split}",
            f"{named.name} has no tags (CoNLL: a last column; tables: column {self.tags_column!r}); "
            f"{split} sentences must be tagged",
        )
        return named.rows

    # --- tokenising ---------------------------------------------------------------------------------------

    @override
    def build_dataset(self, rows: ArrowRows, split: str) -> TaggedDataset:
        """``split``'s sentences tokenised and aligned (cached on disk), as a dataset of token rows."""
        from datasets import Features, List, Value

        predict = split == "predict"
        columns = [TOKENS] if predict else [TOKENS, TAGS]
        tag_ids = None if predict else self._tag_ids(rows, split)
        length = self._truncation()
        key = fingerprint(rows.fingerprint, self.tokenizer_fingerprint, columns, tag_ids, length)
        inputs = [
            name for name in self.tokenizer(["x"], is_split_into_words=True) if name != "attention_mask"
        ]
        types = {"input_ids": "int32", "token_type_ids": "int8", LABELS: "int16", WORD_IDS: "int32"}
        outputs = [*inputs, WORD_IDS, *([] if predict else [LABELS])]
        features = {name: List(Value(types.get(name, "int32"))) for name in outputs}
        tokens = cached_map(
            reopened(rows.rows).select_columns(columns),
            encode_words,
            folder=self.cache / "tagged-tokens",
            key=key,
            input_columns=columns,
            remove_columns=columns,
            features=Features(features | {UNSEEN: Value("int32")}),
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": length, "tag_ids": tag_ids},
            desc=f"tokenizing {split}",
        )
        warn_unseen(tokens, split)
        batch_columns = [*inputs, WORD_IDS if predict else LABELS]
        padding = Padding.of(self.tokenizer)
        padding = replace(padding, fills={**padding.fills, LABELS: IGNORE, WORD_IDS: -1})
        return TaggedDataset(tokens.select_columns(batch_columns).with_format(None), padding, length)

    def describe_data(self) -> str:
        """What the run plan shows about the data: sentences per split, the tags, the loader workers."""
        sizes = {split: self.split_rows(split) for split in ("train", "val", "test")}
        counts = ", ".join(f"{split} {len(rows):,}" for split, rows in sizes.items() if rows is not None)
        tags = self.labels
        shown = ", ".join(tags[:12]) + (f" ... ({len(tags)})" if len(tags) > 12 else "")
        return "\n".join(
            [
                f"sentences: {counts or 'none'} (memory-mapped Arrow files in {self.cache})",
                f"tags: {shown}",
                f"loader workers per process: {self.workers(self.split_dataset('train'))}",
            ]
        )
