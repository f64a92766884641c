"""Teachers for the distillation tests: tiny models saved as export folders (plain HF folder + labels.json)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import save_llama

LABELS = ["negative", "positive"]


def bert_folder(directory: Path, tokenizer_dir: Path, hidden: int, layers: int = 2) -> Path:
    """A random BERT ``layers`` deep, ``hidden`` wide, with the tokenizer of ``tokenizer_dir``."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory


def export_classifier(backbone: Path | dict, labels: list[str], directory: Path) -> Path:
    from finetune import ClassificationTask

    task = ClassificationTask(backbone if isinstance(backbone, dict) else str(backbone), labels=labels)
    task.configure_model()
    return task.export(directory)


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
