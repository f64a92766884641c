"""Instruction-tuning data for causal LMs: JSONL conversations tokenised with the loss on responses only.

Conversations are converted once into memory-mapped Arrow (``finetune.data.arrow``), split, tokenised and
packed by cached ``Dataset.map`` steps (``finetune.data.conversations``): a second run with the same data and
tokenizer starts without tokenising, and no step holds a Python object per conversation.
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from typing_extensions import override

from finetune.backbones.base import Backbone
from finetune.data.arrow import cached_map, fingerprint, read_arrow, reopened
from finetune.data.conversations import (
    IGNORE,
    ConversationChunks,
    JsonlChunks,
    pack_batch,
    pack_plan,
    segments,
    tokenize,
    tokenize_batch,
)
from finetune.data.loaders import TrainValData
from finetune.data.rows import ArrowRows
from finetune.data.splits import check_hold_out, hold_out
from finetune.data.tokens import Padding, TokenizerOfBackbone, gather
from finetune.errors import RecipeError, require
from finetune.paths import resolve_path

if TYPE_CHECKING:
    import datasets

__all__ = ["IGNORE", "InstructionData", "TokenRows", "segments", "tokenize"]

logger = logging.getLogger(__name__)


class TokenRows(torch.utils.data.Dataset):
    """Tokenised rows in a memory-mapped Arrow file; ``collate`` right-pads a batch (padding: id ``pad_id``,
    label -100, mask 0). Pickles as the file's path."""

    def __init__(self, tokens: datasets.Dataset, pad_id: int) -> None:
        self.tokens = tokens
        self.padding = Padding(pad_id, fills={"labels": IGNORE}, side="right")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, list[int]]]:
        return gather(self.tokens, indices)

    def collate(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return self.padding(items)


class JsonlTokenData(TokenizerOfBackbone, TrainValData):
    """What the JSONL data of causal LMs shares (instructions, preference pairs): a train file and a val file
    (or ``val_fraction`` of train held out after sampling ``limit`` rows, by ``seed``), each converted once
    to memory-mapped Arrow by ``reader`` and tokenised by a cached ``Dataset.map`` (``_tokens``, which
    subclasses write), and the loaders over the token rows (``datasets``).

    The backbone may be a run folder or an adapters export of a causal LM: its tokenizer is that of the
    merged model it stands for (``finetune.tasks.sft.causal_lm_backbone``).
    """

    reader: ClassVar[type[JsonlChunks]]

    def __init__(
        self,
        train: str | None,
        val: str | None,
        val_fraction: float,
        limit: int | None,
        max_length: int,
        num_proc: int | None,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        check_hold_out({"val": val_fraction}, limit)
        require(max_length > 1, "data.max_length", f"must be 2 or more, got {max_length}")
        require(num_proc is None or num_proc > 0, "data.num_proc", f"must be 1 or more, got {num_proc}")
        self.sources = {"train": train, "val": val}
        self.val_fraction = val_fraction
        self.limit = limit
        self.max_length = max_length
        self.num_proc = num_proc

    @override
    def backbone_spec(self) -> Backbone:
        from finetune.tasks.sft import causal_lm_backbone

        return causal_lm_backbone(super().backbone_spec())

    @cached_property
    def _splits(self) -> dict[str, ArrowRows]:
        """The train and val rows after ``limit`` and the held-out split."""
        if self.sources["train"] is None:
            raise RecipeError("data.train", "no training data; set data.train to a JSONL file")
        train = self._read("train")
        given_val = self.sources["val"] is not None
        picked = hold_out(len(train), {} if given_val else {"val": self.val_fraction}, self.seed, self.limit)
        val = self._read("val") if given_val else train.take(picked.get("val", np.zeros(0, np.int64)))
        train = train.take(picked["train"])
        logger.info("%s: train %d, val %d", self.reader.noun, len(train), len(val))
        return {"train": train, "val": val}

    def _read(self, split: str) -> ArrowRows:
        key = f"data.{split}"
        path = resolve_path(self.sources[split], key)
        rows, print_ = read_arrow([path], key, "auto", self.cache, reader=self.reader)
        return ArrowRows(rows, print_, self.cache)

    def _tokens(self, split: str) -> datasets.Dataset:
        """The token rows of ``split`` (a cached ``map`` over ``self._splits[split]``)."""
        raise NotImplementedError

    def sample_prompts(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` validation prompts for sample generations: ``prompt`` (text), ``prompt_ids`` and
        ``reference`` (the response the data gives)."""
        raise NotImplementedError

    def _token_rows(self, tokens: datasets.Dataset, pad_id: int) -> TokenRows:
        """The torch dataset of a split's token rows."""
        return TokenRows(tokens, pad_id)

    @cached_property
    def datasets(self) -> dict[str, TokenRows]:
        """The train and val token rows, as torch datasets."""
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return {
            split: self._token_rows(self._tokens(split).with_format(None), pad) for split in ("train", "val")
        }

    def _kept(self, split: str, rows: int, tokens: datasets.Dataset) -> None:
        """Warn when tokenising dropped rows (no response token left within ``max_length``)."""
        if len(tokens) < rows:
            logger.warning(
                "%d %s %s have no response left within max_length %d and are skipped",
                rows - len(tokens),
                split,
                self.reader.noun,
                self.max_length,
            )


class InstructionData(JsonlTokenData):
    """Prompt/response (or chat ``messages``) JSONL files for supervised fine-tuning of a causal LM.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on response tokens).
    ``sample_prompts(n)`` gives validation prompts for sample generations. Conversations and their tokens
    live in memory-mapped Arrow files in ``cache_dir``, written once per data file and tokenizer.
    """

    reader = ConversationChunks

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
        num_workers: int | None = None,
        num_proc: int | None = None,
        cache_dir: str | None = None,
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
            num_workers: data loading worker processes; default: 0 for fewer than 10,000 rows, else
                min(4, CPUs per process - 1).
            num_proc: processes tokenising each split (default: this one).
            cache_dir: folder for the converted conversations and their tokens; default:
                ``$HF_DATASETS_CACHE/finetune``.
            backbone: the model's backbone (for its tokenizer); set from ``model.backbone``.
        """
        super().__init__(
            train,
            val,
            val_fraction,
            limit,
            max_length,
            num_proc,
            backbone=backbone,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
        )
        self.packing = packing

    @property
    def conversations(self) -> dict[str, datasets.Dataset]:
        """The train and val conversations (a ``messages`` column), memory-mapped."""
        return {split: rows.rows for split, rows in self._splits.items()}

    @override
    def _tokens(self, split: str) -> datasets.Dataset:
        rows = self._splits[split]
        key = fingerprint(rows.fingerprint, self.tokenizer_fingerprint, self.max_length, "sft tokens")
        tokens = cached_map(
            reopened(rows.rows),  # the conversations' pages are let go once tokenised
            tokenize_batch,
            folder=self.cache / "tokens",
            key=key,
            num_proc=self.num_proc,
            input_columns=["messages"],
            remove_columns=rows.columns(),
            features=_token_features(),
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length},
            desc=f"tokenizing {split}",
        )
        self._kept(split, len(rows), tokens)
        if self.packing and split == "train":
            return self._pack(tokens, key)
        return tokens

    def _pack(self, tokens: datasets.Dataset, key: str) -> datasets.Dataset:
        import datasets

        ends, count = pack_plan(tokens, self.max_length)
        return cached_map(
            datasets.Dataset.from_dict({"row": np.arange(count)}),
            pack_batch,
            folder=self.cache / "packed",
            key=fingerprint(key, "packed", self.max_length),
            num_proc=self.num_proc,
            input_columns=["row"],
            remove_columns=["row"],
            features=_token_features(),
            fn_kwargs={"tokens": tokens, "ends": ends, "length": self.max_length},
            desc="packing train",
        )

    @override
    def sample_prompts(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` validation conversations up to their last reply: prompt text and ids, and the reference."""
        val = self.conversations["val"]
        samples = []
        for messages in val.select(range(min(n, len(val))))["messages"]:
            parts = segments(self.tokenizer, messages)
            prompt_parts = parts[: max(i for i, (_, response) in enumerate(parts) if response)]
            ids = tokenize(self.tokenizer, prompt_parts, self.max_length)["input_ids"]
            prompt = "".join(t for t, _ in prompt_parts)
            samples.append({"prompt": prompt, "prompt_ids": ids, "reference": messages[-1]["content"]})
        return samples


def _token_features() -> Any:
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})
