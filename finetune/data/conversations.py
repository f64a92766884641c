"""Conversations for instruction tuning: JSONL read in chunks, rendered with a template, tokenised with the
loss on responses only, and packed; the batched steps run as cached ``Dataset.map`` calls.

Each JSONL line is ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role", "content"}, ...]}``
(roles ``system``, ``user``, ``assistant``). Conversations are rendered with the tokenizer's chat template
when it has one, else with the plain template::

    ### System:\\n{content}\\n\\n        (system turns)
    ### Instruction:\\n{content}\\n\\n   (user turns)
    ### Response:\\n{content}<eos>\\n\\n (assistant turns; "### Response:\\n" is the generation prompt)

Labels are the input ids with every token outside an assistant reply set to -100 (prompts, template
text, padding), so the loss covers responses only.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from finetune.data.tables import BLOCK, CHUNK_ROWS, DecodedText
from finetune.errors import RecipeError

if TYPE_CHECKING:
    import datasets

IGNORE = -100
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
Segment = tuple[str, bool]  # (text, is part of a response)


class ConversationChunks:
    """The conversations of a JSONL file as DataFrames of a ``messages`` column (lists of ``{"role",
    "content"}`` ending with an assistant turn), at most ``rows`` at a time; ``replaced`` counts the bytes
    that were not UTF-8 (replaced, as for tables). ``encoding`` and ``dtype`` exist for ``read_arrow``."""

    def __init__(
        self, path: Path, key: str, encoding: str = "auto", rows: int | None = None, dtype: Any = None
    ) -> None:
        self.path = path
        self.key = key
        self.encoding = encoding
        self.rows = rows or CHUNK_ROWS
        self.replaced = 0

    def __iter__(self) -> Iterator[pd.DataFrame]:
        batch: list[list[dict[str, str]]] = []
        found = 0
        with DecodedText(self.path, self.encoding) as text:
            for number, line in enumerate(io.BufferedReader(text, BLOCK), start=1):
                if not line.strip():
                    continue
                batch.append(self._messages(line, number))
                if len(batch) == self.rows:
                    yield pd.DataFrame({"messages": batch})
                    found, batch = found + len(batch), []
        self.replaced = text.replaced
        if batch:
            yield pd.DataFrame({"messages": batch})
        elif not found:
            raise RecipeError(self.key, f"{self.path.name} has no conversations")

    def _messages(self, line: bytes, number: int) -> list[dict[str, str]]:
        name, key = self.path.name, self.key
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(key, f"{name} line {number} is not JSON ({error.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            messages = [{"role": m["role"], "content": str(m["content"])} for m in row["messages"]]
        elif isinstance(row, dict) and "prompt" in row and "response" in row:
            messages = [
                {"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row["response"])},
            ]
        else:
            raise RecipeError(key, f"{name} line {number} needs 'prompt' and 'response', or 'messages'")
        if not messages or messages[-1]["role"] != "assistant":
            raise RecipeError(key, f"{name} line {number} must end with an assistant message")
        return messages


def segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[Segment]:
    """``messages`` as consecutive texts, each marked as response or not (chat template if the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        return _chat_segments(tokenizer, messages)
    eos = tokenizer.eos_token or ""
    parts: list[Segment] = []
    for message in messages:
        header = PLAIN_HEADERS.get(message["role"], f"### {message['role'].title()}:\n")
        if message["role"] == "assistant":
            parts += [(header, False), (message["content"] + eos, True), ("\n\n", False)]
        else:
            parts.append((f"{header}{message['content']}\n\n", False))
    return parts


def _chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[Segment]:
    """Split the rendered chat at each assistant reply: the text a template adds before a reply (with the
    generation prompt) is prompt, the rest of that turn is response."""
    parts: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and through.startswith(before)):
            raise RecipeError("data.train", "the tokenizer's chat template does not render turns as prefixes")
        parts += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    return parts


def tokenize(tokenizer: Any, parts: list[Segment], max_length: int) -> dict[str, list[int]]:
    """Token ids and labels (-100 outside responses), truncated to ``max_length``."""
    bos = tokenizer.bos_token_id
    text = "".join(t for t, _ in parts)
    # A plain template adds BOS itself; a chat template writes it into the text.
    written = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    ids = [bos] if bos is not None and not written else []
    labels = [IGNORE] * len(ids)
    for piece, is_response in parts:
        piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if is_response else [IGNORE] * len(piece_ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_batch(conversations: list[list[dict[str, str]]], *, tokenizer: Any, max_length: int) -> dict:
    """Batched ``map`` step: the token rows of the conversations that keep a response token within
    ``max_length`` (the others are dropped)."""
    rows = [tokenize(tokenizer, segments(tokenizer, messages), max_length) for messages in conversations]
    kept = [row for row in rows if any(label != IGNORE for label in row["labels"])]
    return {name: [row[name] for row in kept] for name in ("input_ids", "labels")}


def pack_plan(tokens: datasets.Dataset, length: int) -> tuple[np.ndarray, int]:
    """The end of each row's tokens in their concatenation, and how many rows of ``length`` it cuts into."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(tokens.data.column("input_ids")).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    return ends, -(-total // length)


def pack_batch(rows: list[int], *, tokens: datasets.Dataset, ends: np.ndarray, length: int) -> dict:
    """Batched ``map`` step over packed-row numbers (consecutive): the token rows are concatenated and cut
    into rows of ``length`` tokens (the last may be shorter); only the rows a batch covers are read.

    Packed examples attend to the ones before them in the same row; their labels keep the response mask.
    """
    import pyarrow.compute as pc

    begin = rows[0] * length
    end = min((rows[-1] + 1) * length, int(ends[-1]))
    first = int(np.searchsorted(ends, begin, side="right"))
    last = int(np.searchsorted(ends, end - 1, side="right"))
    table = tokens.data.fast_slice(first, last - first + 1)
    offset = begin - (int(ends[first - 1]) if first else 0)
    packed = {}
    for name in ("input_ids", "labels"):
        flat = pc.list_flatten(table.column(name)).to_numpy()[offset : offset + end - begin]
        packed[name] = [flat[start : start + length] for start in range(0, len(flat), length)]
    return packed
