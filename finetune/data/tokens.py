"""Token rows in memory-mapped Arrow: gathering a batch of them, and padding it to its longest row."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune.data.arrow import fingerprint

if TYPE_CHECKING:
    import datasets

    from finetune.backbones.base import Backbone


class TokenizerOfBackbone:
    """For data modules that tokenise text: the backbone's tokenizer, loaded once, and its fingerprint
    (datasets' Hasher over its vocabulary, rules and special tokens), which keys the cached token files."""

    backbone_spec: Callable[[], Backbone]

    @cached_property
    def tokenizer(self) -> Any:
        return self.backbone_spec().tokenizer()

    @cached_property
    def tokenizer_fingerprint(self) -> str:
        return fingerprint(self.tokenizer)


def gather(rows: datasets.Dataset, indices: list[int]) -> list[dict[str, Any]]:
    """The rows at ``indices`` of a flat (unselected) Arrow dataset, as dicts, read in one gather."""
    table = rows.data.fast_gather(np.asarray(indices))
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@dataclass(frozen=True)
class Padding:
    """Pads every column of a batch of token rows to the batch's longest row and adds the attention mask.

    ``pad_id`` fills ``input_ids``, ``fills`` other columns (default 0); ``side`` is where padding goes.
    Picklable without a tokenizer, so loader workers get it cheaply.
    """

    pad_id: int
    fills: Mapping[str, int] = field(default_factory=dict)
    side: str = "right"
    attention_mask: bool = True

    @classmethod
    def of(cls, tokenizer: Any) -> Padding:
        """Padding as the tokenizer's own ``pad`` does it (its pad id, side and pad segment id)."""
        return cls(
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            fills={"token_type_ids": tokenizer.pad_token_type_id},
            side=tokenizer.padding_side,
            attention_mask="attention_mask" in tokenizer.model_input_names,
        )

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        lengths = [len(item["input_ids"]) for item in items]
        width = max(lengths)
        fills = {**self.fills, "input_ids": self.pad_id}
        batch = {name: np.full((len(items), width), fills.get(name, 0), dtype=np.int64) for name in items[0]}
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, (item, length) in enumerate(zip(items, lengths)):
            where = slice(0, length) if self.side == "right" else slice(width - length, width)
            for name, values in item.items():
                batch[name][row, where] = values
            mask[row, where] = 1
        if self.attention_mask:
            batch["attention_mask"] = mask
        return {name: torch.from_numpy(values) for name, values in batch.items()}
