"""Tables with a byte-order mark (UTF-16/32 spreadsheet exports, UTF-8 with BOM) read as their encoding."""

from __future__ import annotations

import pytest

from finetune.data import read_table


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig", "utf-32"])
def test_a_table_with_a_byte_order_mark_reads_as_its_encoding(tmp_path, encoding):
    text = "text,label\nnaïve café,positive\nmauvais,negative\n"
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # the big-endian codec writes no mark of its own
    path = tmp_path / "table.csv"
    path.write_bytes(data)
    rows = read_table(path, "data.train")
    frame = rows if hasattr(rows, "columns") else rows.to_pandas()
    assert list(frame.columns) == ["text", "label"]
    assert frame["text"].tolist() == ["naïve café", "mauvais"]
