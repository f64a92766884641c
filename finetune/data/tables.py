"""Read a data table (CSV, TSV, JSON lines, Parquet) from disk, tolerating text that is not valid UTF-8."""

from __future__ import annotations

import codecs
import io
import logging
from pathlib import Path

import pandas as pd

from finetune.errors import RecipeError, first_line

logger = logging.getLogger(__name__)

TEXT_FORMATS = {".csv", ".tsv", ".json", ".jsonl"}
FORMATS = (*sorted(TEXT_FORMATS), ".parquet")


def read_table(path: str | Path, key: str, encoding: str = "auto") -> pd.DataFrame:
    """Read ``path`` into a DataFrame, choosing the format by extension.

    ``encoding="auto"`` reads UTF-8 and replaces undecodable bytes with U+FFFD (logging one warning);
    any other value is used as given. Raises ``RecipeError(key, ...)`` for an unknown extension, a file
    that cannot be parsed, or a table with no rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise RecipeError(
            key, f"cannot read {path.name}: unknown extension {suffix!r}; use one of {', '.join(FORMATS)}"
        )
    text = None if suffix == ".parquet" else _read_text(path, encoding)
    try:
        table = pd.read_parquet(path) if text is None else _parse_text(text, suffix)
    except (ValueError, OSError) as error:
        # pandas' parser errors subclass ValueError; one line is enough to locate the bad file.
        raise RecipeError(
            key, f"cannot read {path.name}: {first_line(error)}; check the file's format"
        ) from error
    if table.empty:
        raise RecipeError(key, f"{path.name} has no rows; give a table with a header and at least one row")
    return table


def _parse_text(text: str, suffix: str) -> pd.DataFrame:
    if not text.strip():
        return pd.DataFrame()
    if suffix == ".csv":
        return pd.read_csv(io.StringIO(text))
    if suffix == ".tsv":
        return pd.read_csv(io.StringIO(text), sep="\t")
    # A .json file may be a JSON array of records rather than JSON lines; both are common exports.
    return pd.read_json(io.StringIO(text), lines=not text.lstrip().startswith("["))


def _read_text(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    if encoding != "auto":
        try:
            return raw.decode(encoding)
        except LookupError:
            raise RecipeError(
                "data.encoding", f"unknown encoding {encoding!r}; use e.g. utf-8, cp1252, latin-1"
            ) from None
        except UnicodeDecodeError as error:
            raise RecipeError(
                "data.encoding",
                f"{path.name} is not valid {encoding} (byte {error.start}); set the file's encoding, or auto",
            ) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text, bad = _decode_replacing(raw)
        logger.warning(
            "%s: %d bytes are not valid UTF-8 and were replaced with U+FFFD; set data.encoding "
            "(e.g. cp1252) to read them in another encoding",
            path.name,
            bad,
        )
        return text


def _decode_replacing(raw: bytes) -> tuple[str, int]:
    """Decode like ``errors="replace"`` and also count the undecodable bytes."""
    view = memoryview(raw)
    parts: list[str] = []
    bad = 0
    position = 0
    while True:
        try:
            parts.append(codecs.utf_8_decode(view[position:], "strict", True)[0])
            return "".join(parts), bad
        except UnicodeDecodeError as error:
            parts.append(codecs.utf_8_decode(view[position : position + error.start], "strict", True)[0])
            parts.append("\ufffd")
            bad += error.end - error.start
            position += error.end
