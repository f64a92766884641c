"""Tiny batches in the shape finetune's data modules produce (model inputs plus ``labels``)."""

from __future__ import annotations

import torch

LABELS = ["a", "b", "c"]


def text_batch(tiny_bert_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = dict(tokenizer(["good movie", "bad day very", "okay food"], padding=True, return_tensors="pt"))
    return batch | {"labels": torch.tensor([0, 1, 2])}


def image_batch(size: int = 160):
    torch.manual_seed(0)
    return {"pixel_values": torch.randn(4, 3, size, size), "labels": torch.tensor([0, 1, 2, 0])}


def lm_batch():
    ids = torch.tensor([[2, 20, 21, 22, 3], [2, 23, 24, 3, 0]])
    labels = ids.masked_fill(ids == 0, -100)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
