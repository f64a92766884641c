"""Builders for the token tagging tests: a word-piece tokenizer whose words split into sub-tokens, a tiny
BERT over it, CoNLL files, and sentences tagged by a fixed rule."""

from __future__ import annotations

import random
from pathlib import Path

# Whole words, and the pieces that continue one: "annas" -> anna ##s, "parisville" -> paris ##ville.
PIECES = ["anna", "bob", "paris", "berlin", "the", "city", "visited", "likes", "and", "today", "visit"]
SUFFIXES = ["##s", "##ville", "##ing"]
PERSON = ["anna", "bob", "annas"]
PLACE = ["paris", "berlin", "parisville"]
OTHER = ["the", "city", "visited", "likes", "and", "today", "visiting"]
TAGS = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]


def make_wordpiece_tokenizer(directory: Path):
    """A BERT word-piece tokenizer over PIECES and SUFFIXES, saved in ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *PIECES, *SUFFIXES]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tagger_bert(directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT (no dropout) with the word-piece tokenizer, saved in ``directory``."""
    import torch
    from transformers import AutoModel, BertConfig

    tokenizer = make_wordpiece_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory


def rule_tags(words: list[str]) -> list[str]:
    """The rule the tests' taggers learn: a person or place word starts an entity (B-) unless the word
    before it is of the same kind, which it then continues (I-)."""
    tags, previous = [], None
    for word in words:
        kind = "PER" if word in PERSON else "LOC" if word in PLACE else None
        tags.append("O" if kind is None else f"{'I' if kind == previous else 'B'}-{kind}")
        previous = kind
    return tags


def rule_sentences(count: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """``count`` random sentences of 3 to 9 words, tagged by ``rule_tags``."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(rng.choice([PERSON, PLACE, OTHER, OTHER])) for _ in range(rng.randint(3, 9))]
        sentences.append((words, rule_tags(words)))
    return sentences


def write_conll(
    path: Path, sentences: list[tuple[list[str], list[str] | None]], docstart: bool = False
) -> Path:
    """Sentences as a CoNLL file: ``word POS tag`` lines (``word`` alone when untagged), blank lines between."""
    lines = ["-DOCSTART- -X- -X- O", ""] if docstart else []
    for words, tags in sentences:
        lines += [word if tags is None else f"{word} X {tag}" for word, tag in zip(words, tags or words)]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
