"""Tables as memory-mapped Arrow: files converted once into a cache folder, and ``Dataset.map`` steps cached.

A table file is converted chunk by chunk (``TableChunks``) into ``<cache>/tables/<fingerprint>.arrow``, keyed
by the file's path, size, modification time and encoding; every later read opens that file memory-mapped, so
no row is in memory until it is read. ``cached_map`` runs ``Dataset.map`` into ``<cache>/<step>/<fingerprint>.arrow``
under a fingerprint of everything its result depends on: a second build loads the result instead of
recomputing it. Several processes may convert the same file at once (each writes its own temporary file and
renames it into place).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from finetune.data.tables import TableChunks, warn_replaced
from finetune.errors import RecipeError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

# Part of every fingerprint: change it when converted tables or cached steps change meaning.
CACHE_VERSION = "finetune-arrow-2"
SCAN_ROWS = 100_000  # rows read at a time when copying or scanning a table


def cache_folder(cache_dir: str | None) -> Path:
    """``cache_dir``, or ``finetune/`` in the Hugging Face datasets cache (``$HF_DATASETS_CACHE``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "finetune"


def fingerprint(*parts: Any) -> str:
    """A short hex digest of ``parts`` (datasets' own ``Hasher``, as its cached ``map`` results use)."""
    from datasets.fingerprint import Hasher

    return Hasher.hash((CACHE_VERSION, *parts))


def file_fingerprint(path: Path, encoding: str) -> str:
    """Changes when the file at ``path`` changes (size or modification time) or is read differently."""
    stat = path.stat()
    return fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns, encoding)


class Chunks(Protocol):
    """A file's rows as DataFrames, one pass per iteration (``TableChunks`` is one); ``replaced`` counts
    the bytes that were not UTF-8, once iterated."""

    replaced: int

    def __iter__(self) -> Iterator[pd.DataFrame]: ...


def read_arrow(
    paths: list[Path],
    key: str,
    encoding: str,
    cache: Path,
    reader: Callable[..., Chunks] = TableChunks,
) -> tuple[datasets.Dataset, str]:
    """The rows of ``paths`` (one table, or shards read in order) as one memory-mapped ``datasets.Dataset``,
    and its fingerprint. ``reader(path, key, encoding, dtype=...)`` reads a file; each file is converted on
    first use, and the warning about bytes that are not UTF-8 is repeated on every read of a conversion."""
    import datasets

    parts, prints = [], []
    for path in paths:
        name = fingerprint(file_fingerprint(path, encoding), reader.__name__)
        target = cache / "tables" / f"{name}.arrow"
        record = target.with_suffix(".json")
        if not (target.is_file() and record.is_file()):
            facts = _convert(reader, path, key, encoding, target)
            _write_atomically(record, json.dumps(facts).encode())
        warn_replaced(path.name, json.loads(record.read_text())["replaced"])
        parts.append(datasets.Dataset.from_file(str(target)))
        prints.append(name)
    if len(parts) == 1:
        return parts[0], prints[0]
    try:
        joined = datasets.concatenate_datasets(parts)
    except ValueError as error:
        raise RecipeError(
            key, f"the shards of {paths[0].parent} have different columns or types ({error})"
        ) from None
    return joined, fingerprint(prints)


def cached_map(
    dataset: datasets.Dataset,
    function: Callable[..., dict[str, Any]],
    *,
    folder: Path,
    key: str,
    num_proc: int | None = None,
    **kwargs: Any,
) -> datasets.Dataset:
    """``dataset.map(function, batched=True, ...)`` written to (or, when it exists, loaded from)
    ``folder/<key>.arrow``; ``key`` must fingerprint the input rows, the function and its arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    if num_proc is not None and num_proc > 1 and len(dataset) < 2 * num_proc:
        num_proc = None  # a few rows are not worth starting processes for
    return dataset.map(
        function,
        batched=True,
        num_proc=num_proc,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        **kwargs,
    )


def memory_mapped(frame: pd.DataFrame, folder: Path, key: str) -> datasets.Dataset:
    """``frame`` written to ``folder/<key>.arrow`` (once: ``key`` must fingerprint its content) and opened
    memory-mapped from there, so the caller can drop the frame."""
    import datasets

    target = folder / f"{key}.arrow"
    if not target.is_file():
        _write_chunks([frame], target)
    return datasets.Dataset.from_file(str(target))


def column_values(dataset: datasets.Dataset, column: str) -> Iterator[Any]:
    """Every value of ``column``, in row order, read ``SCAN_ROWS`` at a time through a copy that is dropped
    after the scan (``reopened``)."""
    for batch in reopened(dataset).data.select([column]).to_batches(max_chunksize=SCAN_ROWS):
        yield from batch.column(0).to_pylist()


def reopened(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` opened anew from its Arrow files (an in-memory one as it is).

    What is read through the copy is mapped into memory only until the copy is dropped: a long scan read
    through it leaves nothing resident, where reading through a dataset that is kept would keep every page
    it touched counted in the process's memory.
    """
    import datasets

    files = [entry["filename"] for entry in dataset.cache_files]
    if not files:
        return dataset
    parts = [datasets.Dataset.from_file(name) for name in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def write_rows(dataset: datasets.Dataset, indices: np.ndarray, target: Path) -> None:
    """Write the rows at ``indices`` (sorted) of ``dataset`` to ``target``, an Arrow file, reading the
    rows in order a batch at a time (what a split of the rows is kept as)."""
    import pyarrow as pa

    table = reopened(dataset).data
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            start = 0
            for batch in table.to_batches(max_chunksize=SCAN_ROWS):
                end = start + batch.num_rows
                first, last = np.searchsorted(indices, [start, end])
                if last > first:
                    writer.write_batch(batch.take(pa.array(indices[first:last] - start)))
                start = end
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


class _TypeConflict(Exception):
    """A column whose values do not fit one Arrow type across chunks: it is read again as text."""

    def __init__(self, column: str) -> None:
        super().__init__(column)
        self.column = column


def _convert(
    reader: Callable[..., Chunks], path: Path, key: str, encoding: str, target: Path
) -> dict[str, int]:
    """Write ``path``'s rows to ``target`` (Arrow IPC stream); return the row and replaced-byte counts.

    Each column gets the type pandas infers for the first chunk; a column that a later chunk cannot be
    cast to (or whose values are of mixed kinds) is read again, from the start, as text.
    """
    as_text: dict[str, Any] = {}
    while True:
        chunks = reader(path, key, encoding, dtype=as_text)
        try:
            rows = _write_chunks(chunks, target)
        except _TypeConflict as conflict:
            if conflict.column in as_text:
                raise RecipeError(key, f"{path.name}: cannot read column {conflict.column!r}") from None
            as_text[conflict.column] = str
            continue
        if rows == 0:
            raise RecipeError(
                key, f"{path.name} has no rows; give a table with a header and at least one row"
            )
        return {"rows": rows, "replaced": chunks.replaced}


def _write_chunks(chunks: Iterable[pd.DataFrame], target: Path) -> int:
    import pyarrow as pa

    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    rows, writer, schema = 0, None, None
    try:
        with pa.OSFile(str(temporary), "wb") as sink:
            for chunk in chunks:
                table = _arrow_table(chunk)
                if schema is None:
                    schema = table.schema
                    writer = pa.ipc.new_stream(sink, schema)
                table = _cast(table, schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is not None:
                writer.close()
        if rows:
            os.replace(temporary, target)
        return rows
    finally:
        temporary.unlink(missing_ok=True)


def _arrow_table(chunk: pd.DataFrame) -> pa.Table:
    import pyarrow as pa

    try:
        return pa.Table.from_pandas(chunk, preserve_index=False).replace_schema_metadata(None)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        for column in chunk.columns:
            try:
                pa.array(chunk[column], from_pandas=True)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise _TypeConflict(str(column)) from None
        raise


def _cast(table: pa.Table, schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    if table.schema.equals(schema):
        return table
    if table.schema.names != schema.names:
        changed = next(iter(set(table.schema.names) ^ set(schema.names)), schema.names[0])
        raise _TypeConflict(str(changed))
    columns = []
    for field, column in zip(schema, table.columns):
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            raise _TypeConflict(field.name) from None
    return pa.Table.from_arrays(columns, schema=schema)


def _write_atomically(path: Path, content: bytes) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)
