"""The loops a careful user writes by hand, for ``bench.parity`` to hold finetune against.

Plain transformers + peft (text, SFT) and timm + torch (images), doing what the finetune recipe of the case
says (``Settings``, read from it by ``bench.parity_cases``): the same model and head; the same rows (the
split finetune made, exported to ``train/val/test.jsonl`` and ``labels.json``) in the same order (each
epoch's is finetune's sampler's, ``default_rng([seed, epoch]).permutation``); AdamW with the same groups
(no decay on biases, norms and embeddings; the head at its own LR); the same warmup and decay per optimizer
step (``transformers.get_scheduler``); the same batch, length, steps and seed. Each epoch validates; the
best epoch's trained weights (and buffers) go to a file and come back at the end, to be tested and saved.

``clock.step(epoch)`` marks each optimizer step (``bench.parity_sides`` times them). Each loop returns its
figure: test accuracy, or for SFT the best validation loss per response token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # label of tokens outside a response


class Clock(Protocol):
    def start(self, model: nn.Module) -> None:
        """Called once, before training: the model as it trains."""

    def step(self, epoch: int) -> None:
        """Called right before each ``optimizer.step()``."""


@dataclass(frozen=True)
class Settings:
    """What a hand loop is told: the values of the case's finetune recipe."""

    model: str  # a Hugging Face folder, or a timm model name
    seed: int
    lr: float
    epochs: int
    batch_size: int
    head_lr: float | None = None  # default: lr
    weight_decay: float = 0.01
    schedule: str = "constant"  # linear | cosine | constant
    warmup_fraction: float = 0.0
    strategy: str = "full"  # full | partial | freeze | lora
    last_blocks: int = 0  # partial: how many top blocks train
    lora: dict[str, Any] = field(default_factory=dict)  # rank, alpha, dropout
    head_dropout: float = 0.0
    max_length: int = 128
    image_size: int | None = None
    checkpoint: str | None = None  # timm: a local weights file
    pretrained: bool = True
    device: str = "cpu"

    def total_steps(self, rows: int) -> int:
        return self.epochs * math.ceil(rows / self.batch_size)


def read_rows(data: Path, split: str) -> list[dict[str, Any]]:
    lines = (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


# --- what the three loops share: the optimizer and the epochs -----------------------------------------------


def adamw(s: Settings, model: nn.Module, is_head: Callable[[str], bool], steps: int) -> tuple[Any, Any]:
    """AdamW over the trainable parameters (no decay on biases, norms and embeddings; the head at
    ``head_lr``) and the LR schedule over ``steps`` optimizer steps."""
    from transformers import get_scheduler

    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_head(name), p.ndim > 1 and "embeddings" not in name), []).append(p)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": (s.head_lr or s.lr) if head else s.lr,
                "weight_decay": s.weight_decay if decays else 0.0,
            }
            for (head, decays), params in groups.items()
        ]
    )
    warmup = round(s.warmup_fraction * steps)
    return optimizer, get_scheduler(s.schedule, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def fit(
    s: Settings,
    model: nn.Module,
    train: list[Any],
    loss_of: Callable[[list[Any]], torch.Tensor],
    validate: Callable[[], float],
    optimizer_and_schedule: tuple[Any, Any],
    out: Path,
    clock: Clock,
    higher_is_better: bool = True,
) -> float:
    """Train for the epochs, validating after each; return the best validation score, whose epoch's
    trained weights are back in ``model``."""
    optimizer, scheduler = optimizer_and_schedule
    best = None
    clock.start(model)
    for epoch in range(s.epochs):
        model.train()
        order = np.random.default_rng([s.seed, epoch]).permutation(len(train))
        for start in range(0, len(order), s.batch_size):
            loss_of([train[i] for i in order[start : start + s.batch_size]]).backward()
            clock.step(epoch)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            score = validate()
        if best is None or (score > best if higher_is_better else score < best):
            best = score
            trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            torch.save(trained | dict(model.named_buffers()), out / "best.pt")  # BatchNorm statistics too
    model.load_state_dict(torch.load(out / "best.pt"), strict=False)
    model.eval()
    return best


def accuracy(logits_of: Callable[[list[Any]], torch.Tensor], split: list[dict[str, Any]], size: int) -> float:
    correct = 0
    for rows in batched(split, size):
        predicted = logits_of(rows).argmax(-1).cpu()
        correct += int((predicted == torch.tensor([r["label"] for r in rows])).sum())
    return correct / len(split)


def batched(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# --- text: a sentence-transformers encoder, mean pooling, a linear head -------------------------------------


class MeanPooled(nn.Module):
    """``AutoModel`` + the mean of the token states over the attention mask + dropout and a linear layer."""

    def __init__(self, encoder: nn.Module, labels: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.config.hidden_size, labels))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        states = self.encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(1) / mask.sum(1).clamp(min=1))


def text_classifier(s: Settings, data: Path, out: Path, clock: Clock) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer, set_seed

    set_seed(s.seed)
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    encoder = AutoModel.from_pretrained(s.model, add_pooling_layer=False)
    if s.strategy == "lora":
        lora = LoraConfig(
            r=s.lora["rank"],
            lora_alpha=s.lora["alpha"],
            lora_dropout=s.lora["dropout"],
            target_modules="all-linear",
        )
        encoder = get_peft_model(encoder, lora)
    elif s.strategy != "full":  # freeze, or partial: the top last_blocks blocks train
        encoder.requires_grad_(False)
        if s.last_blocks:
            encoder.encoder.layer[-s.last_blocks :].requires_grad_(True)
    labels = json.loads((data / "labels.json").read_text())
    model = MeanPooled(encoder, len(labels), s.head_dropout).to(s.device)
    train, val, test = (read_rows(data, split) for split in ("train", "val", "test"))

    def logits_of(rows: list[dict[str, Any]]) -> torch.Tensor:
        texts = [r["text"] for r in rows]
        inputs = tokenizer(texts, truncation=True, max_length=s.max_length, padding=True, return_tensors="pt")
        return model(**inputs.to(s.device))

    def loss_of(rows: list[dict[str, Any]]) -> torch.Tensor:
        return F.cross_entropy(logits_of(rows), torch.tensor([r["label"] for r in rows], device=s.device))

    steps = s.total_steps(len(train))
    schedule = adamw(s, model, lambda name: name.startswith("head."), steps)
    fit(s, model, train, loss_of, lambda: accuracy(logits_of, val, s.batch_size), schedule, out, clock)
    with torch.no_grad():
        result = accuracy(logits_of, test, s.batch_size)
    encoder.save_pretrained(out / "model")  # the adapters alone under LoRA
    torch.save(model.head.state_dict(), out / "model" / "head.pt")
    return result


# --- images: a timm model on class folders ------------------------------------------------------------------


def image_classifier(s: Settings, data: Path, out: Path, clock: Clock) -> float:
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(s.seed)
    labels = json.loads((data / "labels.json").read_text())
    overlay = {"file": s.checkpoint} if s.checkpoint else None
    model = timm.create_model(
        s.model, pretrained=s.pretrained, pretrained_cfg_overlay=overlay, num_classes=len(labels)
    ).to(s.device)
    if s.strategy == "freeze":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    size = {"input_size": (3, s.image_size, s.image_size)} if s.image_size else {}
    transform = create_transform(**resolve_data_config(size, model=model))  # evaluation's; no augmentation
    train, val, test = (read_rows(data, split) for split in ("train", "val", "test"))

    def logits_of(rows: list[dict[str, Any]]) -> torch.Tensor:
        images = []
        for row in rows:
            with Image.open(row["path"]) as image:
                images.append(transform(image.convert("RGB")))
        return model(torch.stack(images).to(s.device))

    def loss_of(rows: list[dict[str, Any]]) -> torch.Tensor:
        return F.cross_entropy(logits_of(rows), torch.tensor([r["label"] for r in rows], device=s.device))

    head = {f"{name}." for name, module in model.named_modules() if module is model.get_classifier()}
    schedule = adamw(s, model, lambda name: any(name.startswith(h) for h in head), s.total_steps(len(train)))
    fit(s, model, train, loss_of, lambda: accuracy(logits_of, val, s.batch_size), schedule, out, clock)
    with torch.no_grad():
        result = accuracy(logits_of, test, s.batch_size)
    torch.save(model.state_dict(), out / "model.pt")
    return result


# --- SFT: a causal LM with LoRA, the loss on responses only -------------------------------------------------


def sft_lora(s: Settings, data: Path, out: Path, clock: Clock) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(s.seed)
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    model = AutoModelForCausalLM.from_pretrained(s.model)
    lora = LoraConfig(
        r=s.lora["rank"],
        lora_alpha=s.lora["alpha"],
        lora_dropout=s.lora["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).to(s.device)

    def encode(messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """The chat's tokens, and as labels the reply's tokens (the prompt's are ``IGNORE``)."""
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        asked = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        reply = tokenizer(whole[len(prompt) :], add_special_tokens=False)["input_ids"]
        return (asked + reply)[: s.max_length], ([IGNORE] * len(asked) + reply)[: s.max_length]

    train, val = ([encode(r["messages"]) for r in read_rows(data, split)] for split in ("train", "val"))

    def loss_and_tokens(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, int]:
        """The mean loss over the batch's reply tokens (right-padded), and how many there are."""
        width = max(len(tokens) for tokens, _ in rows)
        padded = [(tokens, targets, width - len(tokens)) for tokens, targets in rows]
        ids = torch.tensor([t + [tokenizer.pad_token_id] * n for t, _, n in padded])
        labels = torch.tensor([y + [IGNORE] * n for _, y, n in padded])
        mask = torch.tensor([[1] * len(t) + [0] * n for t, _, n in padded])
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        output = model(**{k: v.to(s.device) for k, v in inputs.items()}, use_cache=False)
        return output.loss, int((labels[:, 1:] != IGNORE).sum())

    def validate() -> float:
        sums = [(loss * tokens, tokens) for loss, tokens in map(loss_and_tokens, batched(val, s.batch_size))]
        return float(sum(loss for loss, _ in sums) / sum(tokens for _, tokens in sums))

    schedule = adamw(s, model, lambda name: False, s.total_steps(len(train)))
    best = fit(s, model, train, lambda rows: loss_and_tokens(rows)[0], validate, schedule, out, clock, False)
    model.save_pretrained(out / "model")  # the adapters
    tokenizer.save_pretrained(out / "model")
    return best
