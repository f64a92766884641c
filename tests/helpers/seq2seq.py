"""Tiny encoder-decoder models (T5, BART) with a word-level tokenizer that works offline, and the synthetic
summaries whose target is a fixed function of the source (so a tiny model can learn it)."""

from __future__ import annotations

import json
import random
from pathlib import Path

# The synthetic task (recipes/data/summaries.jsonl holds 60 such rows): a source is one colour, one animal and
# one verb with one to three adverbs, shuffled; its summary is "colour animal verb".
COLOURS, ANIMALS, VERBS, ADVERBS = (
    ["red", "blue", "green"],
    ["cat", "dog", "bird"],
    ["runs", "sits", "sleeps", "jumps"],
    ["fast", "slow"],
)
SUMMARY_WORDS = [*COLOURS, *ANIMALS, *VERBS, *ADVERBS]
PREFIX_WORDS = ["summarize:"]


def make_seq2seq_tokenizer(directory: Path):
    """A word-level tokenizer over the summary words with ``<pad>`` (id 0), ``</s>`` and ``<unk>``, appending
    ``</s>`` to every text as T5's tokenizer does; saved in ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>", *PREFIX_WORDS, *SUMMARY_WORDS]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_tiny_t5(directory: Path, width: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random T5 ``layers`` deep in encoder and decoder, configured as Flan-T5 is (gated-GELU feed-forward,
    ``tie_word_embeddings`` false: no output scaling), with the word-level tokenizer, saved in ``directory``;
    its decoder starts from ``<pad>``. (transformers 5 ties T5's head to the shared embedding whatever the
    config says.)"""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = make_seq2seq_tokenizer(directory)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def save_tiny_bart(directory: Path, width: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random BART ``layers`` deep in encoder and decoder with the word-level tokenizer, in ``directory``."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = make_seq2seq_tokenizer(directory)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=width,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=2 * width,
        decoder_ffn_dim=2 * width,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return directory


def summary_rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` rows ``{source, target}`` of the synthetic task (see ``COLOURS``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        summary = [rng.choice(COLOURS), rng.choice(ANIMALS), rng.choice(VERBS)]
        words = summary + [rng.choice(ADVERBS) for _ in range(rng.randint(1, 3))]
        rng.shuffle(words)
        rows.append({"source": " ".join(words), "target": " ".join(summary)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
