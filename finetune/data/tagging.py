"""Token tagging data (named entities, chunks, parts of speech): sentences of words with one tag per word,
tokenised for a Hugging Face encoder and aligned to its sub-tokens.

Sentences come from CoNLL-style files, JSON lines / Parquet tables or a Hugging Face dataset and are kept in
memory-mapped Arrow files (``finetune.data.arrow``), in two columns: ``tokens`` (the words) and ``tags``
(absent for unlabelled predict data). Each split is tokenised once by a cached ``Dataset.map``, and batches
gather their rows from those files, so memory does not grow with the corpus.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from finetune.batch import INDEX, LABELS
from finetune.data.arrow import cached_map, fingerprint, read_arrow, reopened
from finetune.data.classification import MISSING_SPLIT_FIX, STAGE_SPLITS, NamedTable
from finetune.data.labels import checked_labels
from finetune.data.loaders import LoaderDataModule
from finetune.data.rows import ArrowRows
from finetune.data.splits import check_hold_out, hold_out
from finetune.data.tables import BLOCK, DecodedText
from finetune.data.text import DATASET_SPLITS
from finetune.data.tokens import Padding, TokenizerOfBackbone, gather
from finetune.errors import RecipeError, first_line, require
from finetune.paths import is_local_path, resolve_path

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# The columns every split is kept in, whatever its source names them.
TOKENS = "tokens"
TAGS = "tags"
# Batch key of predict batches: each token's word (-1: a special token or padding). Not a model input.
WORD_IDS = "word_ids"
# The label of sub-tokens that are not the first of their word, of special tokens and of padding.
IGNORE = -100
OUTSIDE = "O"

CONLL_FORMATS = (".conll", ".iob", ".txt")
TABLE_FORMATS = (".jsonl", ".json", ".parquet")
DOCSTART = "-DOCSTART-"
CHUNK_SENTENCES = 10_000  # sentences per DataFrame when converting a CoNLL file


class TokenTaggingData(TokenizerOfBackbone, LoaderDataModule):
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

    Alignment: words are tokenised with ``is_split_into_words=True`` (a fast tokenizer), truncated to
    ``max_length`` tokens. The first sub-token of each word carries the word's tag id; its other sub-tokens,
    special tokens and padding carry -100 (no loss, not scored). Words left without a token (cut by
    ``max_length``, or empty once tokenised) are neither trained on nor scored, and a warning counts them.

    Batches: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them),
    padded to the batch's longest row; ``labels`` (token tag ids, padded with -100; train/val/test); ``index``
    (each row's position in its split). Predict batches carry ``word_ids`` instead of ``labels``: each
    token's word index (-1 for special tokens and padding), padded to the truncation length rather than
    the batch's, so per-word outputs have one width in every batch.
    """

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
        super().__init__(**kwargs)
        check_hold_out({"val": val_fraction, "test": test_fraction}, limit)
        require(max_length > 2, "data.max_length", f"must be 3 or more (room for a word), got {max_length}")
        require(
            tokens_column != tags_column,
            "data.tags_column",
            f"{tags_column!r} is also data.tokens_column; name the column that holds the tags",
        )
        self.sources = {"train": train, "val": val, "test": test, "predict": predict}
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.given_labels = checked_labels(labels)
        self.max_length = max_length
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.limit = limit
        self.encoding = encoding
        self._labels: list[str] | None = None
        self._splits: dict[str, ArrowRows | None] = {}
        # Train sentences before val/test are held out: the tag list comes from all of them.
        self._train_pool: ArrowRows | None = None
        self._datasets: dict[str, TaggedDataset] = {}

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
        if self.dataset is None or split not in DATASET_SPLITS:
            return None
        name = DATASET_SPLITS[split]
        if name not in self._hf_dataset:
            return None
        part = self._hf_dataset[name]
        files = [(f["filename"], Path(f["filename"]).stat().st_mtime_ns) for f in part.cache_files]
        print_ = fingerprint(self.dataset, self.dataset_config, name, files or part.data)
        return self._standard(part, print_, "data.dataset", f"{self.dataset}[{name}]")

    def _read_files(self, path: Path, key: str) -> NamedTable:
        files = sentence_files(path, key)
        if files[0].suffix.lower() in CONLL_FORMATS:
            rows, print_ = read_arrow(files, key, self.encoding, self.cache, reader=ConllChunks)
            return NamedTable(ArrowRows(rows, print_, self.cache), path.name)
        rows, print_ = read_arrow(files, key, self.encoding, self.cache)
        return self._standard(rows, print_, key, path.name)

    def _standard(self, rows: datasets.Dataset, print_: str, key: str, name: str) -> NamedTable:
        """A table's or dataset's sentences in the ``tokens``/``tags`` columns, checked: lists of words, as
        many tags as words, ``ClassLabel`` ids as their names (a cached map)."""
        from datasets import ClassLabel, Features, List, Value

        columns = [c for c in (self.tokens_column, self.tags_column) if c in rows.column_names]
        require(
            self.tokens_column in columns,
            "data.tokens_column",
            f"column {self.tokens_column!r} not in {name}; columns are: {', '.join(rows.column_names)}",
        )
        feature = getattr(rows.features.get(self.tags_column), "feature", None)
        names = list(feature.names) if isinstance(feature, ClassLabel) else None
        step = fingerprint(print_, "sentences", columns, names)
        tagged = len(columns) == 2
        standard = cached_map(
            reopened(rows).select_columns(columns),
            _standard_rows,
            folder=self.cache / "sentences",
            key=step,
            input_columns=columns,
            remove_columns=columns,
            with_indices=True,
            features=Features({column: List(Value("string")) for column in (TOKENS, TAGS)[: len(columns)]}),
            fn_kwargs={"key": key, "name": name, "columns": columns, "names": names},
            desc=f"reading {name}",
        )
        if not tagged:
            logger.info("%s has no column %r: its sentences are untagged", name, self.tags_column)
        return NamedTable(ArrowRows(standard, step, self.cache), name)

    @cached_property
    def _hf_dataset(self) -> Any:
        """The ``datasets.DatasetDict`` named by ``dataset``, loaded once."""
        import datasets

        name = self.dataset
        source = str(resolve_path(name, "data.dataset")) if is_local_path(name) else name
        try:
            loaded = datasets.load_dataset(source, self.dataset_config)
        except (datasets.exceptions.DatasetsError, OSError, ConnectionError, ValueError) as error:
            raise RecipeError(
                "data.dataset",
                f"cannot load {name!r} ({first_line(error)}); give a local dataset folder or a cached dataset name",
            ) from error
        logger.info("loaded dataset %s with splits %s", name, ", ".join(loaded))
        return loaded

    # --- tags ---------------------------------------------------------------------------------------------

    @property
    def labels(self) -> list[str]:
        """The tags in id order: ``labels`` if given, else those of all train sentences (before holding out)."""
        if self._labels is None:
            self._labels = self._resolve_labels()
        return list(self._labels)

    def _resolve_labels(self) -> list[str]:
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

    def save_labels(self, directory: Path) -> Path:
        """Write ``labels.json`` (a JSON list of the tags in id order) into ``directory``; return its path."""
        import json

        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "labels.json"
        path.write_text(json.dumps(self.labels, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        return path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"labels": self.labels}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restored = [str(tag) for tag in state_dict["labels"]]
        if self._labels is not None and self._labels != restored:
            raise RecipeError(
                "data.labels",
                f"the checkpoint has tags {restored} but this data gives {self._labels}; set data.labels to match",
            )
        self.given_labels = restored

    # --- splits -------------------------------------------------------------------------------------------

    def split_rows(self, split: str) -> ArrowRows | None:
        """``split``'s sentences (columns ``tokens`` and, when tagged, ``tags``), or None when there are none."""
        if split not in self._splits:
            self._splits.update(self._predict_split() if split == "predict" else self._fit_splits())
        return self._splits[split]

    def predict_table(self) -> datasets.Dataset:
        """The sentences of the predict split, in predict-loader order; join predictions on ``index``."""
        rows = self.split_rows("predict")
        if rows is None:
            raise RecipeError("data.predict", f"no sentences to tag; {MISSING_SPLIT_FIX['predict']}")
        return rows.rows

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

    def _fit_splits(self) -> dict[str, ArrowRows | None]:
        """train/val/test: read the given ones, then sample train and hold out the missing ones from it."""
        splits = {split: self._load(split) for split in ("train", "val", "test")}
        train = splits["train"]
        if train is not None:
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            missing = {split: fraction for split, fraction in fractions.items() if splits[split] is None}
            picked = hold_out(len(train), missing, self.seed, self.limit)
            self._train_pool = train.take(np.sort(np.concatenate(list(picked.values()))))
            splits.update({split: train.take(indices) for split, indices in picked.items()})
        logger.info(
            "sentences: %s", ", ".join(f"{s} {0 if t is None else len(t)}" for s, t in splits.items())
        )
        return splits

    def _predict_split(self) -> dict[str, ArrowRows | None]:
        rows = self._load("predict")
        if rows is None:
            named = [(name, self.split_rows(name)) for name in ("test", "val")]
            name, rows = next(((n, t) for n, t in named if t is not None), (None, None))
            if name is not None:
                logger.warning("no data.predict: tagging the %s split", name)
        return {"predict": rows}

    # --- tokenising ---------------------------------------------------------------------------------------

    def split_dataset(self, split: str) -> TaggedDataset:
        """The (cached) tokenised dataset of ``split``; RecipeError when the recipe gives no data for it."""
        if split not in self._datasets:
            rows = self.split_rows(split)
            if rows is None:
                raise RecipeError(f"data.{split}", f"no {split} data; {MISSING_SPLIT_FIX[split]}")
            self._datasets[split] = self._tokenised(rows, split)
        return self._datasets[split]

    def _tokenised(self, rows: ArrowRows, split: str) -> TaggedDataset:
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
            _encode_words,
            folder=self.cache / "tagged-tokens",
            key=key,
            input_columns=columns,
            remove_columns=columns,
            features=Features(features | {"unseen": Value("int32")}),
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": length, "tag_ids": tag_ids},
            desc=f"tokenizing {split}",
        )
        _warn_unseen(tokens, split)
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

    # --- Lightning hooks ----------------------------------------------------------------------------------

    @override
    def prepare_data(self) -> None:
        """Set up the trainer's stage on one process per machine first (Lightning holds the others back
        until it is done): they then find the converted and tokenised files in the cache."""
        if self.trainer is not None:
            self.setup(self.trainer.state.fn.value)

    @override
    def setup(self, stage: str) -> None:
        """Build the datasets of ``stage``'s splits (validation is optional when fitting)."""
        for split in STAGE_SPLITS[stage]:
            optional = stage == "fit" and split == "val"
            if not (optional and self.split_rows(split) is None):
                self.split_dataset(split)

    @override
    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.split_dataset("train"))

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # An empty list tells Lightning there is no validation (val_fraction 0 and no data.val).
        return [] if self.split_rows("val") is None else self.eval_loader(self.split_dataset("val"))

    @override
    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.split_dataset("test"))

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.eval_loader(self.split_dataset("predict"))


class TaggedDataset(Dataset):
    """Tokenised sentences in a memory-mapped Arrow file; item ``i`` is row ``i``'s token columns plus
    ``index``. ``collate`` pads a batch to its longest row (``labels`` with -100), and ``word_ids`` to
    ``width``. Pickles as the file's path (cheap to send to loader workers)."""

    def __init__(self, tokens: datasets.Dataset, padding: Padding, width: int) -> None:
        self.tokens = tokens
        self.padding = padding
        self.width = width

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        items = gather(self.tokens, rows)
        for item, row in zip(items, rows):
            item[INDEX] = row
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([item[INDEX] for item in items], dtype=torch.long)
        batch = self.padding([{k: v for k, v in item.items() if k != INDEX} for item in items])
        if WORD_IDS in batch:
            word_ids = batch[WORD_IDS]
            batch[WORD_IDS] = F.pad(word_ids, (0, self.width - word_ids.shape[1]), value=-1)
        batch[INDEX] = index
        return batch


class ConllChunks:
    """The sentences of a CoNLL file as DataFrames (columns ``tokens`` and, when tagged, ``tags``) of at
    most ``sentences`` rows, read in one pass per iteration: the ``reader`` of ``read_arrow``.

    A file is tagged when its first token line has two or more columns (the tag is the last); then every
    token line must have a tag, else none may. ``-DOCSTART-`` lines end a sentence and are skipped. Text is
    decoded as table files are (``DecodedText``); ``replaced`` counts the bytes that were not UTF-8.
    ``dtype`` (``read_arrow`` re-reads columns of mixed types as text with it) is unused: every column here
    is text.
    """

    def __init__(
        self,
        path: Path,
        key: str,
        encoding: str = "auto",
        dtype: Any = None,
        sentences: int = CHUNK_SENTENCES,
    ) -> None:
        self.path = path
        self.key = key
        self.encoding = encoding
        self.sentences = sentences
        self.replaced = 0

    def __iter__(self) -> Iterator[pd.DataFrame]:
        tagged: bool | None = None
        first = 0  # the first token line: whether it had a tag decides for the file
        found, words, tags = 0, [], []
        sentences: list[tuple[list[str], list[str]]] = []
        with DecodedText(self.path, self.encoding) as raw:
            for number, line in enumerate(io.TextIOWrapper(io.BufferedReader(raw, BLOCK), "utf-8"), 1):
                fields = line.split()
                if fields and fields[0] != DOCSTART:
                    if tagged is None:
                        tagged, first = len(fields) > 1, number
                    if (len(fields) > 1) != tagged:
                        raise self._mixed(number, line, first)
                    words.append(fields[0])
                    tags.append(fields[-1])
                    continue
                if words:
                    sentences.append((words, tags))
                    words, tags = [], []
                if len(sentences) >= self.sentences:
                    found += len(sentences)
                    yield _frame(sentences, bool(tagged))
                    sentences = []
            self.replaced = raw.replaced
        if words:
            sentences.append((words, tags))
        if not found and not sentences:
            raise RecipeError(
                self.key,
                f"{self.path.name} has no sentences; give one token per line (its tag in the last column) "
                "and a blank line between sentences",
            )
        if sentences:
            yield _frame(sentences, bool(tagged))

    def _mixed(self, number: int, line: str, first: int) -> RecipeError:
        """A token line whose taggedness differs from the file's first token line (``first``)."""
        where = (
            f"line {first} has no tag but line {number} has one"
            if number != first and len(line.split()) > 1
            else f"line {number} ({line.strip()!r}) has no tag"
        )
        return RecipeError(
            self.key,
            f"{self.path.name} {where}; give every token its tag in the last column (predict files: none)",
        )


def _frame(sentences: list[tuple[list[str], list[str]]], tagged: bool) -> pd.DataFrame:
    columns = {TOKENS: [words for words, _ in sentences]}
    if tagged:
        columns[TAGS] = [tags for _, tags in sentences]
    return pd.DataFrame(columns)


def sentence_files(path: Path, key: str) -> list[Path]:
    """``path`` itself, or the files in folder ``path`` in name order; all CoNLL or all tables, else
    RecipeError (``key``)."""
    files = (
        sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if path.is_dir()
        else [path]
    )
    require(bool(files), key, f"{path} holds no files; give CoNLL files or JSON lines / Parquet tables")
    kinds = set()
    for file in files:
        suffix = file.suffix.lower()
        require(
            suffix in CONLL_FORMATS + TABLE_FORMATS,
            key,
            f"cannot read {file.name}: unknown extension {suffix!r}; use CoNLL ({', '.join(CONLL_FORMATS)}) "
            f"or a table of word and tag lists ({', '.join(TABLE_FORMATS)})",
        )
        kinds.add(suffix in CONLL_FORMATS)
    require(len(kinds) == 1, key, f"{path} mixes CoNLL files and tables; give files of one kind")
    return files


def tag_names(rows: ArrowRows) -> set[str]:
    """The distinct tags of a split's sentences."""
    import pyarrow.compute as pc

    column = reopened(rows.rows).data.column(TAGS)
    return {tag for tag in pc.unique(pc.list_flatten(column)).to_pylist() if tag is not None}


def _standard_rows(*batch: Any, key: str, name: str, columns: list[str], names: list[str] | None) -> dict:
    """Batched ``map`` step: words (and tags) as lists of strings, checked; ``ClassLabel`` ids as ``names``."""
    *values, indices = batch
    words = [_strings(value, columns[0], key, name, row) for value, row in zip(values[0], indices)]
    if len(values) == 1:
        return {TOKENS: words}
    tags = []
    for value, sentence, row in zip(values[1], words, indices):
        sentence_tags = _strings(value, columns[1], key, name, row, names)
        require(
            len(sentence_tags) == len(sentence),
            key,
            f"{name} row {row} has {len(sentence)} words but {len(sentence_tags)} tags; give one tag per word",
        )
        tags.append(sentence_tags)
    return {TOKENS: words, TAGS: tags}


def _strings(
    value: Any, column: str, key: str, name: str, row: int, names: list[str] | None = None
) -> list[str]:
    if not isinstance(value, list) or any(item is None for item in value):
        raise RecipeError(key, f"{name} row {row}: {column!r} is {value!r}, not a list of words or tags")
    return [names[item] for item in value] if names is not None else [str(item) for item in value]


def _encode_words(
    words: list[list[str]],
    tags: list[list[str]] | None = None,
    *,
    tokenizer: Any,
    max_length: int,
    tag_ids: dict[str, int] | None,
) -> dict[str, list]:
    """Batched ``map`` step: token columns, each token's word (-1: special), the first sub-token labels
    (with tags), and how many words of each sentence got no token (``unseen``)."""
    encodings = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    columns = {name: values for name, values in encodings.items() if name != "attention_mask"}
    columns[WORD_IDS], columns["unseen"] = [], []
    if tags is not None:
        columns[LABELS] = []
    for row, sentence in enumerate(words):
        word_ids = [-1 if word is None else word for word in encodings.word_ids(row)]
        columns[WORD_IDS].append(word_ids)
        columns["unseen"].append(len(sentence) - len(set(word_ids) - {-1}))
        if tags is not None:
            columns[LABELS].append(first_token_labels(word_ids, [tag_ids[tag] for tag in tags[row]]))
    return columns


def first_token_labels(word_ids: list[int], word_tags: list[int]) -> list[int]:
    """Per token: the tag id of its word on the word's first sub-token, -100 elsewhere (other sub-tokens,
    special tokens: word -1)."""
    labels, previous = [], -1
    for word in word_ids:
        labels.append(word_tags[word] if word >= 0 and word != previous else IGNORE)
        previous = word
    return labels


def _warn_unseen(tokens: datasets.Dataset, split: str) -> None:
    import pyarrow.compute as pc

    unseen = reopened(tokens).data.column("unseen")
    words = pc.sum(unseen).as_py() or 0
    if words:
        sentences = pc.sum(pc.greater(unseen, 0)).as_py()
        logger.warning(
            "%s: %d words of %d sentences got no token (cut by data.max_length, or empty once tokenised); "
            "they are neither trained on nor scored, and predictions tag them O",
            split,
            words,
            sentences,
        )
