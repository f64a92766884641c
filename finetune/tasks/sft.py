"""Supervised fine-tuning (instruction tuning) of a decoder-only Hugging Face language model."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from finetune import runs
from finetune.backbones import Backbone
from finetune.backbones.layout import Layout, discover_layout
from finetune.export import export_causal_lm
from finetune.optim import TokenNormalizedLoss
from finetune.strategies import Strategy
from finetune.tasks.base import FinetuneTask
from finetune.tasks.loss_terms import StepOutputs

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask")


class SFTTask(TokenNormalizedLoss, FinetuneTask):
    """Next-token loss on response tokens (the data sets every other label to -100).

    Under gradient accumulation the training loss is the mean over all response tokens of the optimizer
    step, not a mean of per-micro-batch means (``TokenNormalizedLoss``).

    Registered loss terms (``finetune.tasks.loss_terms``) see the full-length token logits with
    ``reduction="sum"`` and ``mask`` marking the positions whose next token is a response token; their
    sums are normalised together with the task loss.

    Logs ``train/loss``, ``val/loss`` (mean per response token) and ``val/perplexity``. After each
    validation epoch it greedily completes the first ``samples`` validation prompts of an ``InstructionData``
    datamodule and appends them to ``<run>/samples.jsonl``.

    Args:
        backbone: a Hugging Face causal LM: ``hf:ID``, a local folder, or a full backbone spec.
        strategy: what trains: ``lora`` (default), ``qlora``, ``full`` ... or a strategy object.
        samples: how many validation prompts to complete after each validation epoch (0: none).
        max_new_tokens: length limit of those completions.
        **kwargs: ``optimizer`` and ``lr_scheduler``, as ``FinetuneTask`` takes them.
    """

    epoch_metrics = ("val/loss", "val/perplexity")
    teacher_kind = "causal_lm"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "lora",
        samples: int = 3,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, **kwargs)
        self.samples = samples
        self.max_new_tokens = max_new_tokens
        self.val_nll = MeanMetric()
        self.save_hyperparameters(
            self.base_hparams() | {"samples": samples, "max_new_tokens": max_new_tokens}
        )

    def build_model(self) -> tuple[nn.Module, Layout]:
        model = self.load_backbone(self.strategy.load_options())
        output = model.get_output_embeddings()
        head = tuple(name for name, module in model.named_modules() if module is output)
        return model, discover_layout(model, head, new_head=False)

    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        return self.backbone.load_causal_lm(options)

    @override
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits."""
        return self.forward_features(batch, ())[0]

    def forward_features(
        self, batch: Mapping[str, torch.Tensor], names: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token logits and the named features (``pooled``, ``hidden.N``) of one forward pass."""
        from finetune.backbones.hf import hidden_features

        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        output = self.model(**inputs, use_cache=False, output_hidden_states=bool(names))
        return output.logits, hidden_features(output.hidden_states, inputs.get("attention_mask"), names)

    def token_losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the next-token losses over the batch's target tokens, and how many there are."""
        return _next_token_losses(self(batch), batch["labels"])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, features = self.forward_features(batch, self.requested_features())
        loss_sum, tokens = _next_token_losses(logits, batch["labels"])
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
        outputs = StepOutputs(logits, batch, loss_sum, reduction="sum", mask=mask, features=features)
        total = self.total_loss(outputs, len(batch["input_ids"]), per=tokens)
        return self.token_loss(total, tokens)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Weight by response tokens, so val/loss is the mean over tokens and exp() of it the perplexity.
        loss_sum, tokens = self.token_losses(batch)
        self.val_nll.update(loss_sum / tokens.clamp(min=1), weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log("val/loss", nll, prog_bar=True)
        self.log("val/perplexity", nll.exp(), prog_bar=True)
        if self.samples and not self.trainer.sanity_checking:
            self._write_samples()

    @torch.no_grad()
    def _write_samples(self) -> None:
        """Greedy completions of the first validation prompts, appended to ``<run>/samples.jsonl`` by rank 0.

        A sharded model generates on every process (each forward gathers weights from all of them, and every
        process generates the same tokens, so they stop together); an unsharded one on rank 0 alone.
        """
        from finetune.data import InstructionData
        from finetune.parallel.placement import is_sharded

        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, InstructionData) or not (
            self.trainer.is_global_zero or is_sharded(self)
        ):
            return
        rows = [
            self._complete(datamodule.tokenizer, sample) for sample in datamodule.sample_prompts(self.samples)
        ]
        if not self.trainer.is_global_zero:
            return
        path = runs.run_dir(self.trainer) / runs.SAMPLES
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        log.info("Wrote sample generations to %s", path)

    def _complete(self, tokenizer: Any, sample: dict[str, Any]) -> dict[str, Any]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([sample["prompt_ids"]], device=self.device)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        row = {"epoch": self.current_epoch, "step": self.global_step, "prompt": sample["prompt"]}
        return row | {"reference": sample["reference"], "generation": text}

    def export(self, directory: Path, merge: bool = False) -> Path:
        """A Hugging Face folder (safetensors) with the tokenizer; adapters alone unless ``merge``."""
        return export_causal_lm(self, directory, merge)


def _next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the next-token cross-entropies over target tokens (labels != -100), and their count."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss_sum, (targets != -100).sum()
