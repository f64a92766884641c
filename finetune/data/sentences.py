"""Tagged sentences as token tagging reads them: CoNLL files into Arrow (``ConllChunks``, a ``read_arrow``
reader), the files of a split, Hugging Face datasets, and the rows of tables and datasets brought to the two
columns every split is kept in: ``tokens`` (each sentence's words) and ``tags`` (one per word; absent for
unlabelled predict data)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from finetune.data.arrow import cached_map, fingerprint, reopened
from finetune.data.rows import ArrowRows
from finetune.data.tables import BLOCK, DecodedText
from finetune.errors import RecipeError, require

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# The columns every split is kept in, whatever its source names them.
TOKENS = "tokens"
TAGS = "tags"
CONLL_FORMATS = (".conll", ".iob", ".txt")
TABLE_FORMATS = (".jsonl", ".json", ".parquet")
DOCSTART = "-DOCSTART-"
CHUNK_SENTENCES = 10_000  # sentences per DataFrame when converting a CoNLL file


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


def standard_sentences(
    rows: datasets.Dataset, print_: str, key: str, name: str, columns: Mapping[str, str], cache: Path
) -> ArrowRows:
    """A table's or dataset's sentences (``print_`` fingerprints its rows) in the ``tokens``/``tags``
    columns, checked: lists of words, as many tags as words, ``ClassLabel`` ids as their names. ``columns``
    names the source's word and tag columns by their recipe keys (``data.tokens_column``,
    ``data.tags_column``, in that order); without the tag column, the sentences are untagged. Written once
    into ``cache`` (a cached map); errors in rows are raised on ``key``."""
    from datasets import ClassLabel, Features, List, Value

    (words_key, words), (_, tags) = columns.items()
    present = [column for column in (words, tags) if column in rows.column_names]
    require(
        words in present,
        words_key,
        f"column {words!r} not in {name}; columns are: {', '.join(rows.column_names)}",
    )
    feature = getattr(rows.features.get(tags), "feature", None)
    names = list(feature.names) if isinstance(feature, ClassLabel) else None
    step = fingerprint(print_, "sentences", present, names)
    standard = cached_map(
        reopened(rows).select_columns(present),
        standard_rows,
        folder=cache / "sentences",
        key=step,
        input_columns=present,
        remove_columns=present,
        with_indices=True,
        features=Features({column: List(Value("string")) for column in (TOKENS, TAGS)[: len(present)]}),
        fn_kwargs={"key": key, "name": name, "columns": present, "names": names},
        desc=f"reading {name}",
    )
    if len(present) == 1:
        logger.info("%s has no column %r: its sentences are untagged", name, tags)
    return ArrowRows(standard, step, cache)


def standard_rows(*batch: Any, key: str, name: str, columns: list[str], names: list[str] | None) -> dict:
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
