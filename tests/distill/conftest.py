"""Teachers for the distillation tests: tiny models saved as export folders (plain HF folder + labels.json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.models import bert_folder, export_classifier, save_llama

LABELS = ["negative", "positive"]


@pytest.fixture(scope="session")
def bert_teacher(tiny_bert_dir, tmp_path_factory) -> Path:
    """An exported 48-wide BERT classifier over LABELS, sharing the tiny BERT's tokenizer."""
    root = tmp_path_factory.mktemp("bert-teacher")
    backbone = bert_folder(root / "backbone", tiny_bert_dir, hidden=48)
    return export_classifier(backbone, LABELS, root / "export")


@pytest.fixture(scope="session")
def three_class_teacher(tiny_bert_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bert-teacher-3")
    return export_classifier(tiny_bert_dir, ["negative", "neutral", "positive"], root / "export")


@pytest.fixture(scope="session")
def llama_teacher(tiny_llama_dir, tmp_path_factory) -> Path:
    """A 3-layer, 96-wide random Llama with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return save_llama(tmp_path_factory.mktemp("llama-teacher"), tokenizer, hidden=96, layers=3, seed=2)
