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


class JsonlChunks:
    """The rows of a JSONL file as DataFrames, at most ``rows`` at a time: each line's JSON object becomes one
    row of the columns ``row`` returns (subclasses say how, and raise ``RecipeError`` on bad lines);
    ``replaced`` counts the bytes that were not UTF-8 (replaced, as for tables). ``encoding`` and ``dtype``
    exist for ``read_arrow``."""

    noun = "rows"  # what the file holds, for the error on an empty file

    def __init__(
        self, path: Path, key: str, encoding: str = "auto", rows: int | None = None, dtype: Any = None
    ) -> None:
        self.path = path
        self.key = key
        self.encoding = encoding
        self.rows = rows or CHUNK_ROWS
        self.replaced = 0

    def row(self, value: Any, where: str) -> dict[str, Any]:
        """The columns of one line's JSON ``value``; ``where`` (file and line) starts error messages."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[pd.DataFrame]:
        batch: list[dict[str, Any]] = []
        found = 0
        with DecodedText(self.path, self.encoding) as text:
            for number, line in enumerate(io.BufferedReader(text, BLOCK), start=1):
                if not line.strip():
                    continue
                where = f"{self.path.name} line {number}"
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise RecipeError(self.key, f"{where} is not JSON ({error.msg})") from None
                batch.append(self.row(value, where))
                if len(batch) == self.rows:
                    yield _frame(batch)
                    found, batch = found + len(batch), []
        self.replaced = text.replaced
        if batch:
            yield _frame(batch)
        elif not found:
            raise RecipeError(self.key, f"{self.path.name} has no {self.noun}")


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame({name: [row[name] for row in rows] for name in rows[0]})


class ConversationChunks(JsonlChunks):
    """The conversations of a JSONL file as DataFrames of a ``messages`` column (lists of ``{"role",
    "content"}`` ending with an assistant turn)."""

    noun = "conversations"

    def row(self, value: Any, where: str) -> dict[str, Any]:
        if isinstance(value, dict) and "messages" in value:
            messages = [{"role": m["role"], "content": str(m["content"])} for m in value["messages"]]
        elif isinstance(value, dict) and "prompt" in value and "response" in value:
            messages = [
                {"role": "user", "content": str(value["prompt"])},
                {"role": "assistant", "content": str(value["response"])},
            ]
        else:
            raise RecipeError(self.key, f"{where} needs 'prompt' and 'response', or 'messages'")
        if not messages or messages[-1]["role"] != "assistant":
            raise RecipeError(self.key, f"{where} must end with an assistant message")
        return {"messages": messages}


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


def tokenize(
    tokenizer: Any, parts: list[Segment], max_length: int | None, start: bool = True
) -> dict[str, list[int]]:
    """Token ids and labels (-100 outside responses), truncated to ``max_length`` (None: not). ``start``: the parts
    begin the sequence, which then begins with BOS (false: they continue one, as a response after its prompt)."""
    bos = tokenizer.bos_token_id
    text = "".join(t for t, _ in parts)
    # A plain template adds BOS itself; a chat template writes it into the text.
    written = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    ids = [bos] if start and bos is not None and not written else []
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
