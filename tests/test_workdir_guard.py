"""The guard that fails tests writing into the repository sees new files and new trees, and nothing else."""

from __future__ import annotations

from tests.helpers.workdir import entries, new_entries


def test_new_files_and_trees_are_reported_once(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("x")
    (tmp_path / ".venv").mkdir()
    before = entries(tmp_path)
    (tmp_path / "recipes" / "a.yaml").write_text("changed")  # edits are not new entries
    (tmp_path / "config.yaml").write_text("written by a run")
    (tmp_path / "runs" / "quickstart" / "version_0").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "version_0" / "last.ckpt").write_bytes(b"")
    (tmp_path / ".venv" / "cache").write_text("ignored")
    assert new_entries(tmp_path, before) == ["config.yaml", "runs"]


def test_nothing_new_is_nothing_reported(tmp_path):
    (tmp_path / "a").write_text("x")
    assert new_entries(tmp_path, entries(tmp_path)) == []
