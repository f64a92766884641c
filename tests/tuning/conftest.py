"""Until ``finetune/cli/__init__.py`` registers ``lr-find`` and ``sweep`` in COMMANDS, register them for these
tests. Delete this file once it does."""

from __future__ import annotations

import pytest

from finetune.cli import COMMANDS


@pytest.fixture(autouse=True)
def _tuning_commands(monkeypatch):
    monkeypatch.setitem(COMMANDS, "lr-find", "finetune.cli.lr_find:main")
    monkeypatch.setitem(COMMANDS, "sweep", "finetune.cli.sweep:main")
