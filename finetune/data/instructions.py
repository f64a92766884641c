"""Instruction-tuning data for causal LMs: JSONL conversations tokenised with the loss on responses only.

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

import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from typing_extensions import override

from finetune.backbones.base import Backbone
from finetune.data.loaders import LoaderDataModule
from finetune.data.splits import check_hold_out, hold_out
from finetune.errors import RecipeError, require
from finetune.paths import resolve_path

logger = logging.getLogger(__name__)

IGNORE = -100
PLAIN_HEADERS = {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}
Segment = tuple[str, bool]  # (text, is part of a response)


def read_conversations(path: Path, key: str) -> list[list[dict[str, str]]]:
    """The conversations in a JSONL file, each a list of ``{"role", "content"}`` ending in an assistant turn."""
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecipeError(key, f"{path.name} line {number} is not JSON ({error.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            messages = [{"role": m["role"], "content": str(m["content"])} for m in row["messages"]]
        elif isinstance(row, dict) and "prompt" in row and "response" in row:
            messages = [
                {"role": "user", "content": str(row["prompt"])},
                {"role": "assistant", "content": str(row["response"])},
            ]
        else:
            raise RecipeError(key, f"{path.name} line {number} needs 'prompt' and 'response', or 'messages'")
        if not messages or messages[-1]["role"] != "assistant":
            raise RecipeError(key, f"{path.name} line {number} must end with an assistant message")
        conversations.append(messages)
    if not conversations:
        raise RecipeError(key, f"{path.name} has no conversations")
    return conversations


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


def pack(examples: list[dict[str, list[int]]], length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples and cut them into rows of ``length`` tokens (the last row may be shorter).

    Packed examples attend to the ones before them in the same row; their labels keep the response mask.
    """
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [
        {"input_ids": ids[i : i + length], "labels": labels[i : i + length]}
        for i in range(0, len(ids), length)
    ]


class TokenRows(torch.utils.data.Dataset):
    """Tokenised rows; ``collate`` right-pads a batch (padding: id ``pad_id``, label -100, mask 0)."""

    def __init__(self, rows: list[dict[str, list[int]]], pad_id: int) -> None:
        self.rows = rows
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]

    def collate(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch = {
            name: torch.full((len(items), width), fill)
            for name, fill in (("input_ids", self.pad_id), ("labels", IGNORE), ("attention_mask", 0))
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = torch.tensor(item["input_ids"])
            batch["labels"][row, :n] = torch.tensor(item["labels"])
            batch["attention_mask"][row, :n] = 1
        return batch


class InstructionData(LoaderDataModule):
    """Prompt/response (or chat ``messages``) JSONL files for supervised fine-tuning of a causal LM.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on response tokens).
    ``sample_prompts(n)`` gives validation prompts for sample generations.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        val_fraction: float = 0.1,
        limit: int | None = None,
        max_length: int = 512,
        packing: bool = False,
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        backbone: str | Backbone | None = None,
    ) -> None:
        """
        Args:
            train: JSONL file of conversations (``pkg://package/path`` works too).
            val: JSONL file for validation; default: ``val_fraction`` of ``train``.
            val_fraction: share of ``train`` held out for validation when ``val`` is not given.
            limit: use a random sample of this many train conversations.
            max_length: truncate each conversation (or packed row) to this many tokens.
            packing: concatenate training conversations into rows of ``max_length`` tokens (no padding).
            seed: seed for ``limit``, the held-out split and the shuffling order.
            batch_size: training batch size.
            eval_batch_size: validation batch size; default ``batch_size``.
            num_workers: data loading worker processes.
            backbone: the model's backbone (for its tokenizer); set from ``model.backbone``.
        """
        super().__init__(
            backbone=backbone,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )
        check_hold_out({"val": val_fraction}, limit)
        require(max_length > 1, "data.max_length", f"must be 2 or more, got {max_length}")
        self.sources = {"train": train, "val": val}
        self.val_fraction = val_fraction
        self.limit = limit
        self.max_length = max_length
        self.packing = packing

    @cached_property
    def tokenizer(self) -> Any:
        return self.backbone_spec().tokenizer()

    @cached_property
    def conversations(self) -> dict[str, list[list[dict[str, str]]]]:
        """The train and val conversations after ``limit`` and the held-out split."""
        if self.sources["train"] is None:
            raise RecipeError("data.train", "no training data; set data.train to a JSONL file")
        train = read_conversations(resolve_path(self.sources["train"], "data.train"), "data.train")
        given_val = self.sources["val"] is not None
        picked = hold_out(len(train), {} if given_val else {"val": self.val_fraction}, self.seed, self.limit)
        if given_val:
            val = read_conversations(resolve_path(self.sources["val"], "data.val"), "data.val")
        else:
            val = [train[i] for i in picked.get("val", ())]
        train = [train[i] for i in picked["train"]]
        logger.info("conversations: train %d, val %d", len(train), len(val))
        return {"train": train, "val": val}

    def _rows(self, split: str) -> list[dict[str, list[int]]]:
        rows = [
            tokenize(self.tokenizer, segments(self.tokenizer, messages), self.max_length)
            for messages in self.conversations[split]
        ]
        kept = [row for row in rows if any(label != IGNORE for label in row["labels"])]
        if len(kept) < len(rows):
            logger.warning(
                "%d %s conversations have no response left within max_length %d and are skipped",
                len(rows) - len(kept),
                split,
                self.max_length,
            )
        return pack(kept, self.max_length) if self.packing and split == "train" else kept

    @cached_property
    def datasets(self) -> dict[str, TokenRows]:
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return {split: TokenRows(self._rows(split), pad) for split in ("train", "val")}

    def sample_prompts(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` validation conversations up to their last reply: prompt text and ids, and the reference."""
        samples = []
        for messages in self.conversations["val"][:n]:
            parts = segments(self.tokenizer, messages)
            prompt_parts = parts[: max(i for i, (_, response) in enumerate(parts) if response)]
            ids = tokenize(self.tokenizer, prompt_parts, self.max_length)["input_ids"]
            prompt = "".join(t for t, _ in prompt_parts)
            samples.append({"prompt": prompt, "prompt_ids": ids, "reference": messages[-1]["content"]})
        return samples

    @override
    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.datasets["train"])

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # An empty list tells Lightning there is no validation.
        dataset = self.datasets["val"]
        return self.eval_loader(dataset) if len(dataset) else []
