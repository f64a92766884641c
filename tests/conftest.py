"""Shared fixtures: tiny random-init models saved to disk (read back through the real loaders) and tiny data.

Nothing here touches the network: HF_HUB_OFFLINE is set before any Hugging Face import.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Converted and tokenised tables go to a folder of this test session, not the user's cache.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="finetune-tests-datasets-")

import csv  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.models import make_lm_tokenizer, save_llama, save_tiny_bert, sentence  # noqa: E402
from tests.helpers.workdir import entries, new_entries  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _writes_nothing_into_the_repository():
    """Fail a test that leaves new files in the repository (they end up committed): write under tmp_path."""
    before = entries(REPOSITORY)
    yield
    written = new_entries(REPOSITORY, before)
    if written:
        pytest.fail(f"the test wrote into the repository: {', '.join(written[:5])}; write under tmp_path")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT with its tokenizer, saved as a Hugging Face folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_timm_checkpoint(tmp_path_factory) -> Path:
    """Weights of timm's ``test_vit`` (random init) saved as safetensors, for ``checkpoint:`` loading."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    path = tmp_path_factory.mktemp("tiny-vit") / "test_vit.safetensors"
    save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory) -> Path:
    """80 labelled sentences (positive/negative by a keyword), columns ``text,label``."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(80):
            label = "positive" if i % 2 else "negative"
            writer.writerow([sentence(rng, label), label])
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """ImageFolder layout: ``red/`` and ``blue/`` with 12 noisy 40x40 PNGs each."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (root / label).mkdir()
        for i in range(12):
            pixels = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(170, 255, size=(40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random Llama causal LM with a word-level tokenizer, saved as a Hugging Face folder.

    64 wide because bitsandbytes quantises in blocks of 64 values.
    """
    directory = tmp_path_factory.mktemp("tiny-llama")
    return save_llama(directory, make_lm_tokenizer(directory), hidden=64, layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """A 2+2-block, 32-wide random T5 with a word-level tokenizer (``</s>`` appended, decoder starts at pad)."""
    from tests.helpers.seq2seq import save_tiny_t5

    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))
