"""Builders for the token tagging tests: a word-piece tokenizer whose words split into sub-tokens, a tiny
BERT over it, CoNLL files, and sentences tagged by a fixed rule."""

from __future__ import annotations

import random
from pathlib import Path

from tests.helpers.models import save_tiny_bert

# Whole words, and the pieces that continue one: "annas" -> anna ##s, "parisville" -> paris ##ville.
PIECES = ["anna", "bob", "paris", "berlin", "the", "city", "visited", "likes", "and", "today", "visit"]
SUFFIXES = ["##s", "##ville", "##ing"]
PERSON = ["anna", "bob", "annas"]
PLACE = ["paris", "berlin", "parisville"]
OTHER = ["the", "visited", "likes", "and", "today", "visiting"]
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
    return save_tiny_bert(directory, dropout=0.0, seed=seed, tokenizer_of=make_wordpiece_tokenizer)


def rule_tags(words: list[str]) -> list[str]:
    """The rule the tests' taggers learn, word by word: a person starts a PER entity, a place a LOC entity,
    ``city`` continues a LOC entity (``rule_sentences`` puts it only after a place), anything else is O."""
    return [
        "B-PER" if w in PERSON else "B-LOC" if w in PLACE else "I-LOC" if w == "city" else "O" for w in words
    ]


def rule_sentences(count: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """``count`` random sentences tagged by ``rule_tags``: 1 to 3 entities (a person; a place, sometimes
    followed by ``city``), each after one or two other words."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words: list[str] = []
        for _ in range(rng.randint(1, 3)):
            words += rng.sample(OTHER, rng.randint(1, 2))
            if rng.random() < 0.5:
                words.append(rng.choice(PERSON))
            else:
                words += [rng.choice(PLACE)] + (["city"] if rng.random() < 0.4 else [])
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


def save_byte_level_tokenizer(directory: Path) -> Path:
    """A RoBERTa byte-level BPE tokenizer learnt from the tagging words, with a RoBERTa config (no weights:
    enough for data modules), saved in ``directory``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    text = [" ".join(PERSON + PLACE + OTHER)] * 10
    bpe.train_from_iterator(text, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    merges = [tuple(line.split()) for line in (directory / "merges.txt").read_text().splitlines()[1:] if line]
    vocab = bpe.get_vocab()
    RobertaTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    RobertaConfig(vocab_size=len(vocab)).save_pretrained(directory)
    return directory
