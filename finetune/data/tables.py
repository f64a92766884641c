"""Read a data table (CSV, TSV, JSON lines, Parquet) from disk, tolerating text that is not valid UTF-8.

``read_table`` reads a whole file into a DataFrame (small tables: image paths). ``TableChunks`` reads one in
DataFrames of a bounded number of rows, so a file of any size passes through a bounded amount of memory; the
Arrow cache and streaming read through it. Both decode text the same way (``DecodedText``).
"""

from __future__ import annotations

import codecs
import io
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from finetune.errors import RecipeError, first_line

logger = logging.getLogger(__name__)

TEXT_FORMATS = {".csv", ".tsv", ".json", ".jsonl"}
FORMATS = (*sorted(TEXT_FORMATS), ".parquet")
BLOCK = 1 << 20  # bytes decoded at a time
CHUNK_ROWS = 50_000  # rows per DataFrame of TableChunks


def check_format(path: Path, key: str) -> str:
    """The lower-case extension of ``path``; RecipeError (``key``) when it is not a table format."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise RecipeError(
            key, f"cannot read {path.name}: unknown extension {suffix!r}; use one of {', '.join(FORMATS)}"
        )
    return suffix


def read_table(path: str | Path, key: str, encoding: str = "auto") -> pd.DataFrame:
    """Read ``path`` into a DataFrame, choosing the format by extension.

    ``encoding="auto"`` reads UTF-8 and replaces undecodable bytes with U+FFFD (logging one warning);
    any other value is used as given. Raises ``RecipeError(key, ...)`` for an unknown extension, a file
    that cannot be parsed, or a table with no rows.
    """
    path = Path(path)
    suffix = check_format(path, key)
    with _parse_errors(path, key):
        if suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with DecodedText(path, encoding) as text:
                table = _parse(text, suffix, chunk_rows=None, dtype=None)
            warn_replaced(path.name, text.replaced)
    if table.empty:
        raise _no_rows(path, key)
    return table


class TableChunks:
    """The rows of a table file as DataFrames of at most ``rows`` (default ``CHUNK_ROWS``) rows, read in one
    pass per iteration.

    Text is decoded as ``read_table`` does; after an iteration, ``replaced`` counts the bytes that were not
    valid UTF-8 (``encoding="auto"``). ``dtype`` maps columns to a pandas dtype to read them as (text
    formats), ``columns`` keeps only those columns. A JSON array (not JSON lines) is read whole, in one chunk.
    """

    def __init__(
        self,
        path: Path,
        key: str,
        encoding: str = "auto",
        rows: int | None = None,
        dtype: Mapping[str, Any] | None = None,
        columns: list[str] | None = None,
    ) -> None:
        self.path = path
        self.key = key
        self.encoding = encoding
        self.rows = rows or CHUNK_ROWS
        self.dtype = dict(dtype or {})
        self.columns = columns
        self.suffix = check_format(path, key)
        self.replaced = 0

    def __iter__(self) -> Iterator[pd.DataFrame]:
        with _parse_errors(self.path, self.key):
            if self.suffix == ".parquet":
                yield from self._parquet()
                return
            with DecodedText(self.path, self.encoding) as text:
                chunks = _parse(text, self.suffix, self.rows, self.dtype or None)
                for chunk in [chunks] if isinstance(chunks, pd.DataFrame) else chunks:
                    yield chunk if self.columns is None else chunk[self.columns]
            self.replaced = text.replaced

    def _parquet(self) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        with pq.ParquetFile(self.path) as file:
            for batch in file.iter_batches(batch_size=self.rows, columns=self.columns):
                yield batch.to_pandas()


def warn_replaced(name: str, replaced: int) -> None:
    """The one warning about bytes that were not UTF-8 (read with ``encoding: auto``)."""
    if replaced:
        logger.warning(
            "%s: %d bytes are not valid UTF-8 and were replaced with U+FFFD; set data.encoding "
            "(e.g. cp1252) to read them in another encoding",
            name,
            replaced,
        )


@contextmanager
def _parse_errors(path: Path, key: str) -> Iterator[None]:
    """Turn a parser's error into one RecipeError line that locates the bad file."""
    try:
        yield
    except RecipeError:
        raise
    except pd.errors.EmptyDataError:
        raise _no_rows(path, key) from None
    except (ValueError, OSError) as error:  # pandas' and pyarrow's parser errors subclass these
        raise RecipeError(
            key, f"cannot read {path.name}: {first_line(error)}; check the file's format"
        ) from error


def _no_rows(path: Path, key: str) -> RecipeError:
    return RecipeError(key, f"{path.name} has no rows; give a table with a header and at least one row")


def _parse(
    text: DecodedText, suffix: str, chunk_rows: int | None, dtype: dict[str, Any] | None
) -> pd.DataFrame | Iterator[pd.DataFrame]:
    """A DataFrame (``chunk_rows`` None) or an iterator of DataFrames of ``chunk_rows`` rows."""
    lead = text.lead()
    if not lead:
        return pd.DataFrame()
    stream = io.BufferedReader(text, BLOCK)
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        return pd.read_csv(stream, sep=sep, chunksize=chunk_rows, dtype=dtype)
    # A .json file may be a JSON array of records rather than JSON lines; both are common exports.
    lines = lead != "["
    return pd.read_json(stream, lines=lines, chunksize=chunk_rows if lines else None, dtype=dtype)


class DecodedText(io.RawIOBase):
    """A text file as UTF-8 bytes, decoded ``BLOCK`` bytes at a time.

    ``encoding="auto"``: UTF-8, each undecodable byte sequence replaced by U+FFFD like ``errors="replace"``
    (``replaced`` counts the bytes). Any other encoding is decoded strictly; a byte it cannot decode, or an
    unknown encoding, raises ``RecipeError`` on ``data.encoding``.
    """

    def __init__(self, path: Path, encoding: str) -> None:
        super().__init__()
        self.name = path.name
        self.encoding = encoding
        self.replaced = 0
        self._decoder = None
        if encoding != "auto":
            try:
                self._decoder = codecs.getincrementaldecoder(encoding)("strict")
            except LookupError:
                raise RecipeError(
                    "data.encoding", f"unknown encoding {encoding!r}; use e.g. utf-8, cp1252, latin-1"
                ) from None
        self._file = path.open("rb")
        if encoding == "auto":
            self._decoder = _bom_decoder(self._file.read(4), path.name)
            self._file.seek(0)
        self._pending = b""  # undecoded bytes: the start of a character cut by the block's end
        self._read = 0  # bytes read from the file
        self._out = b""
        self._position = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._position == len(self._out) and not self._done:
            self._fill()
        count = min(len(buffer), len(self._out) - self._position)
        buffer[:count] = self._out[self._position : self._position + count]
        self._position += count
        return count

    def lead(self) -> str:
        """The first character that is not ASCII whitespace ("" for an empty text); nothing is consumed."""
        while not self._out[self._position :].lstrip() and not self._done:
            self._fill()
        return self._out[self._position :].lstrip()[:1].decode("ascii", errors="replace")

    def close(self) -> None:
        self._file.close()
        super().close()

    def _fill(self) -> None:
        block = self._file.read(BLOCK)
        self._done = not block
        decoded = self._decode(self._pending + block, final=self._done)
        self._read += len(block)
        self._out = self._out[self._position :] + decoded
        self._position = 0

    def _decode(self, data: bytes, final: bool) -> bytes:
        if self._decoder is not None:
            return self._decode_strict(data, final)
        text, used, bad = decode_replacing(data, final)
        self._pending = data[used:]
        self.replaced += bad
        # Valid UTF-8 passes through as it is; only a block with replacements is re-encoded.
        return data[:used] if not bad else text.encode("utf-8")

    def _decode_strict(self, data: bytes, final: bool) -> bytes:
        self._pending = b""
        buffered = len(self._decoder.getstate()[0])
        try:
            return self._decoder.decode(data, final).encode("utf-8")
        except UnicodeDecodeError as error:
            at = self._read - buffered + error.start
            raise RecipeError(
                "data.encoding",
                f"{self.name} is not valid {self.encoding} (byte {at}); set the file's encoding, or auto",
            ) from None


def decode_replacing(data: bytes, final: bool = True) -> tuple[str, int, int]:
    """Decode UTF-8 like ``errors="replace"`` and count the undecodable bytes.

    Returns ``(text, bytes used, bytes replaced)``; unless ``final``, an incomplete character at the end is
    left unused for the next block, so decoding block by block gives the text of decoding all at once.
    """
    view = memoryview(data)
    parts: list[str] = []
    bad = 0
    position = 0
    while True:
        try:
            text, used = codecs.utf_8_decode(view[position:], "strict", final)
            parts.append(text)
            return "".join(parts), position + used, bad
        except UnicodeDecodeError as error:
            parts.append(codecs.utf_8_decode(view[position : position + error.start], "strict", True)[0])
            parts.append("\ufffd")
            bad += error.end - error.start
            position += error.end


def table_files(path: Path, key: str) -> list[Path]:
    """``path`` itself, or the table files in folder ``path`` in name order (shards of one table)."""
    if not path.is_dir():
        check_format(path, key)
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    if not files:
        raise RecipeError(
            key,
            f"{path} is a folder without table files; give a table file ({', '.join(FORMATS)}) or a folder of them",
        )
    return files


def _bom_decoder(head: bytes, name: str) -> Any:
    """A decoder for a file that starts with a byte-order mark (UTF-16/32 exports of spreadsheets, UTF-8 with
    BOM), which plain UTF-8 would read as garbage; None for other files (read as UTF-8)."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
        (codecs.BOM_UTF8, "utf-8-sig"),
    ):
        if head.startswith(bom):
            logger.info("%s starts with a %s byte-order mark: read as %s", name, encoding.upper(), encoding)
            return codecs.getincrementaldecoder(encoding)("strict")
    return None
