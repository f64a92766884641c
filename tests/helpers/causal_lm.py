"""A tiny causal LM task for accumulation tests (the SFT task itself lives with the LoRA work)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from finetune.optim.token_loss import TokenNormalizedLoss

VOCAB = 40


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def sequences(count: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 24, (count,), generator=generator)
    return [torch.randint(1, VOCAB, (int(n),), generator=generator) for n in lengths]


def pad(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked and has label -100."""
    width = max(len(s) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class CausalLM(TokenNormalizedLoss, pl.LightningModule):
    """Next-token loss on a tiny Llama; ``normalize=False`` is Lightning's mean of micro-batch means."""

    def __init__(self, normalize: bool = True, lr: float = 0.0) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.normalize = normalize
        self.lr = lr

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss_sum = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        tokens = (labels != -100).sum()
        return self.token_loss(loss_sum, tokens) if self.normalize else loss_sum / tokens

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
