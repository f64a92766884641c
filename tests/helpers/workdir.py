"""Catch tests that write into the repository (run folders, checkpoints, a saved config) instead of tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

# Caches and environments that running the tests legitimately creates or changes.
SKIPPED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}


def entries(root: Path) -> set[str]:
    """Every file and folder under ``root`` (relative paths), outside the skipped caches."""
    found: set[str] = set()
    for directory, folders, files in os.walk(root):
        folders[:] = [f for f in folders if f not in SKIPPED and not f.endswith(".egg-info")]
        relative = os.path.relpath(directory, root)
        for name in (*folders, *files):
            found.add(os.path.normpath(os.path.join(relative, name)))
    return found


def new_entries(root: Path, before: set[str]) -> list[str]:
    """What appeared under ``root`` since ``before = entries(root)``; only the topmost new path of a new tree."""
    added = entries(root) - before
    return sorted(path for path in added if os.path.dirname(path) not in added)
