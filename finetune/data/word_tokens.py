"""Sentences split into words, tokenised for a Hugging Face encoder: each tag on the first sub-token of its
word (``encode_words``, a batched ``map`` step), and the dataset that batches the tokenised sentences."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from finetune.batch import INDEX, LABELS
from finetune.data.arrow import reopened
from finetune.data.tokens import Padding, gather

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# Batch key of predict batches: each token's word (-1: a special token or padding). Not a model input.
WORD_IDS = "word_ids"
# The label of sub-tokens that are not the first of their word, of special tokens and of padding.
IGNORE = -100
# How many words of a sentence got no token (a column of the tokenised rows, not of batches).
UNSEEN = "unseen"


class TaggedDataset(Dataset):
    """Tokenised sentences in a memory-mapped Arrow file; item ``i`` is row ``i``'s token columns plus
    ``index``. ``collate`` pads a batch to its longest row (``labels`` with -100), and ``word_ids`` to
    ``width``. Pickles as the file's path (cheap to send to loader workers)."""

    def __init__(self, tokens: datasets.Dataset, padding: Padding, width: int) -> None:
        self.tokens = tokens
        self.padding = padding
        self.width = width

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[dict[str, Any]]:
        items = gather(self.tokens, rows)
        for item, row in zip(items, rows):
            item[INDEX] = row
        return items

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        index = torch.tensor([item[INDEX] for item in items], dtype=torch.long)
        batch = self.padding([{k: v for k, v in item.items() if k != INDEX} for item in items])
        if WORD_IDS in batch:
            word_ids = batch[WORD_IDS]
            batch[WORD_IDS] = F.pad(word_ids, (0, self.width - word_ids.shape[1]), value=-1)
        batch[INDEX] = index
        return batch


def encode_words(
    words: list[list[str]],
    tags: list[list[str]] | None = None,
    *,
    tokenizer: Any,
    max_length: int,
    tag_ids: dict[str, int] | None,
) -> dict[str, list]:
    """Batched ``map`` step: token columns, each token's word (-1: special), the first sub-token labels
    (with tags), and how many words of each sentence got no token (``unseen``)."""
    encodings = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    columns = {name: values for name, values in encodings.items() if name != "attention_mask"}
    columns[WORD_IDS], columns[UNSEEN] = [], []
    if tags is not None:
        columns[LABELS] = []
    for row, sentence in enumerate(words):
        word_ids = [-1 if word is None else word for word in encodings.word_ids(row)]
        columns[WORD_IDS].append(word_ids)
        columns[UNSEEN].append(len(sentence) - len(set(word_ids) - {-1}))
        if tags is not None:
            columns[LABELS].append(first_token_labels(word_ids, [tag_ids[tag] for tag in tags[row]]))
    return columns


def first_token_labels(word_ids: list[int], word_tags: list[int]) -> list[int]:
    """Per token: the tag id of its word on the word's first sub-token, -100 elsewhere (other sub-tokens,
    special tokens: word -1)."""
    labels, previous = [], -1
    for word in word_ids:
        labels.append(word_tags[word] if word >= 0 and word != previous else IGNORE)
        previous = word
    return labels


def warn_unseen(tokens: datasets.Dataset, split: str) -> None:
    import pyarrow.compute as pc

    unseen = reopened(tokens).data.column(UNSEEN)
    words = pc.sum(unseen).as_py() or 0
    if words:
        sentences = pc.sum(pc.greater(unseen, 0)).as_py()
        logger.warning(
            "%s: %d words of %d sentences got no token (cut by data.max_length, or empty once tokenised); "
            "they are neither trained on nor scored, and predictions tag them O",
            split,
            words,
            sentences,
        )
