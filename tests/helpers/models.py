"""Builders of tiny random models that several test folders share."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any


def save_llama(directory: Path, tokenizer, hidden: int, layers: int, seed: int) -> Path:
    """A random Llama causal LM of the given size for ``tokenizer``, saved with it in ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "okay", "movie", "food", "day", "very", "not"]
POSITIVE = {"good", "great", "fine"}
NEGATIVE = {"bad", "awful", "poor"}


def make_tokenizer(directory: Path):
    """A word-level BERT tokenizer over WORDS, saved in ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    return tokenizer


def sentence(rng: random.Random, label: str) -> str:
    pool = {"positive": POSITIVE, "negative": NEGATIVE}[label]
    words = [rng.choice(sorted(pool))] + [
        rng.choice(["movie", "food", "day", "very"]) for _ in range(rng.randint(1, 5))
    ]
    rng.shuffle(words)
    return " ".join(words)


LM_WORDS = [
    "###",
    "Instruction:",
    "Response:",
    "System:",
    "say",
    "hello",
    "world",
    "count",
    "one",
    "two",
    "three",
]


def make_lm_tokenizer(directory: Path):
    """A word-level tokenizer with BOS/EOS/PAD over WORDS and LM_WORDS (no chat template), saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<unk>", "<s>", "</s>", *WORDS, *LM_WORDS]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


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


def save_tiny_bert(
    directory: Path, dropout: float = 0.1, seed: int = 0, tokenizer_of: Callable[[Path], Any] | None = None
) -> Path:
    """A 2-layer, 32-wide random BERT (``seed``) with a tokenizer (``tokenizer_of(directory)``; default the
    word-level one, ``make_tokenizer``), saved in ``directory``."""
    import torch
    from transformers import AutoModel, BertConfig

    tokenizer = (tokenizer_of or make_tokenizer)(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory
