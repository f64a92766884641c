"""Fixtures for the data tests: backbones built from the shared tiny models, and small table writers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    """Converted tables and tokenised splits go to a temporary cache, shared by the data tests."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets-cache"))
        yield


@pytest.fixture
def bert_backbone(tiny_bert_dir: Path) -> str:
    """The tiny BERT folder as a backbone name (its tokenizer drives text preprocessing)."""
    return str(tiny_bert_dir)


@pytest.fixture
def vit_backbone(tiny_timm_checkpoint: Path):
    """timm ``test_vit`` read from the local checkpoint (its transform drives image preprocessing)."""
    from finetune.backbones import Backbone

    return Backbone(name="timm:test_vit", checkpoint=str(tiny_timm_checkpoint))


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    """``write_csv(name, **columns)`` writes a CSV of equal-length columns into ``tmp_path``."""
    import pandas as pd

    def write(name: str, **columns: list) -> Path:
        path = tmp_path / name
        pd.DataFrame(columns).to_csv(path, index=False)
        return path

    return write
