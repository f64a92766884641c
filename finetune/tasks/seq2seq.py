"""Sequence-to-sequence fine-tuning (summarisation, translation) of a Hugging Face encoder-decoder: T5, BART."""

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
from finetune.backbones.layout import Layout, language_model_layout
from finetune.errors import require
from finetune.export import export_language_model
from finetune.optim import TokenNormalizedLoss
from finetune.strategies import Strategy
from finetune.tasks.base import FinetuneTask
from finetune.tasks.loss_terms import StepOutputs

log = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


class Seq2SeqTask(TokenNormalizedLoss, FinetuneTask):
    """Cross-entropy of the decoder on the target tokens (the data pads targets with -100), given the source.

    Under gradient accumulation the training loss is the mean over all target tokens of the optimizer step,
    not a mean of per-micro-batch means (``TokenNormalizedLoss``). Registered loss terms see the decoder's
    logits with ``reduction="sum"`` and ``mask`` marking the target positions (position ``t`` predicts
    target token ``t``).

    Logs ``train/loss`` and ``val/loss`` (mean per target token; the best checkpoint is the lowest). After
    each validation epoch (not the sanity check) it greedily generates (``num_beams=1``, no sampling; other
    settings of the model's generation config, such as ``min_length``, still apply) for the first
    ``generate_rows`` validation rows of a ``Seq2SeqData`` datamodule, logs their ROUGE F-measures against
    the references as ``val/rouge1``, ``val/rouge2`` and ``val/rougeL`` (0 to 1, torchmetrics' ROUGE:
    lower-cased words and digits, no stemming, averaged over the rows) and appends every generation to
    ``<run>/samples.jsonl``. Generation runs on rank 0 (on every rank for a sharded model) and the scores
    are broadcast, so every rank logs the same values.

    Distillation is not offered (``teacher_kind`` None): a teacher would be an encoder-decoder, which the
    distillation teachers do not load yet.

    Args:
        backbone: a Hugging Face encoder-decoder LM (``AutoModelForSeq2SeqLM``): ``hf:ID``, a local folder,
            or a full backbone spec.
        strategy: what trains: ``lora`` (default), ``qlora``, ``full``, ``partial`` ... or a strategy object.
        generate_rows: how many validation rows (the first ones) to generate for and score with ROUGE
            after each validation epoch; None: all of them; 0: no generation and no ROUGE.
        max_new_tokens: length limit of those generations.
        **kwargs: ``optimizer`` and ``lr_scheduler``, as ``FinetuneTask`` takes them.
    """

    epoch_metrics = ("val/loss", *(f"val/{key}" for key in ROUGE_KEYS))
    teacher_kind = None

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "lora",
        generate_rows: int | None = 32,
        max_new_tokens: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, **kwargs)
        require(
            generate_rows is None or generate_rows >= 0,
            "model.generate_rows",
            f"must be 0 or more (or null: every validation row), got {generate_rows}",
        )
        require(max_new_tokens > 0, "model.max_new_tokens", f"must be 1 or more, got {max_new_tokens}")
        self.generate_rows = generate_rows
        self.max_new_tokens = max_new_tokens
        self.val_nll = MeanMetric()
        self.save_hyperparameters(
            self.base_hparams() | {"generate_rows": generate_rows, "max_new_tokens": max_new_tokens}
        )

    def build_model(self) -> tuple[nn.Module, Layout]:
        model = self.load_backbone(self.strategy.load_options())
        return model, language_model_layout(model)

    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        return self.backbone.load_seq2seq_lm(options)

    @override
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's logits ``(B, T, V)`` for the batch's targets (teacher forcing)."""
        return self.forward_features(batch, ())[0]

    def forward_features(
        self, batch: Mapping[str, torch.Tensor], names: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decoder logits and the named features (``pooled``, ``hidden.N``) of the decoder, in one forward
        pass; ``pooled`` averages the decoder's last hidden state over the target tokens."""
        from finetune.backbones.hf import hidden_features

        labels = batch["labels"]
        output = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            # The model's own shift: its decoder start token, then the targets, -100 read as padding.
            decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels=labels),
            use_cache=False,
            output_hidden_states=bool(names),
        )
        features = hidden_features(output.decoder_hidden_states, (labels != -100).long(), names)
        return output.logits, features

    def token_losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the cross-entropies over the batch's target tokens, and how many there are."""
        return _target_losses(self(batch), batch["labels"])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, features = self.forward_features(batch, self.requested_features())
        labels = batch["labels"]
        loss_sum, tokens = _target_losses(logits, labels)
        outputs = StepOutputs(
            logits, batch, loss_sum, reduction="sum", mask=labels != -100, features=features
        )
        total = self.total_loss(outputs, len(batch["input_ids"]), per=tokens)
        return self.token_loss(total, tokens)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Weight by target tokens, so val/loss is the mean over tokens.
        loss_sum, tokens = self.token_losses(batch)
        self.val_nll.update(loss_sum / tokens.clamp(min=1), weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_nll.compute(), prog_bar=True)
        self.val_nll.reset()
        if self.generate_rows != 0 and not self.trainer.sanity_checking:
            scores = self._generation_scores()
            if scores is not None:
                for key, value in zip(ROUGE_KEYS, scores.tolist()):
                    self.log(f"val/{key}", value, prog_bar=key == "rougeL")

    def _generation_scores(self) -> torch.Tensor | None:
        """ROUGE-1, -2 and -L of rank 0's generations, the same on every rank; None without ``Seq2SeqData``
        or validation rows."""
        from finetune.data.seq2seq import Seq2SeqData
        from finetune.parallel.placement import is_sharded

        datamodule = self.datamodule()
        if not isinstance(datamodule, Seq2SeqData) or not len(datamodule.datasets["val"]):
            return None
        scores = torch.zeros(len(ROUGE_KEYS))
        if self.trainer.is_global_zero or is_sharded(self):
            # A sharded forward gathers weights from every rank, so all generate (the same tokens).
            rows = self._generate(datamodule)
            if self.trainer.is_global_zero:
                scores = rouge(rows)
                self._append_samples(rows)
        return self.trainer.strategy.broadcast(scores, src=0)

    @torch.no_grad()
    def _generate(self, datamodule: Any) -> list[dict[str, Any]]:
        """Greedy generations for the first ``generate_rows`` validation rows, as sample rows."""
        tokenizer = datamodule.tokenizer
        rows = []
        for batch, sources, references in datamodule.generation_batches(self.generate_rows):
            generated = self.model.generate(
                **{key: value.to(self.device) for key, value in batch.items()},
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            rows += [
                {"epoch": self.current_epoch, "step": self.global_step, "source": source}
                | {"reference": reference, "generation": text.strip()}
                for source, reference, text in zip(sources, references, texts)
            ]
        return rows

    def _append_samples(self, rows: list[dict[str, Any]]) -> None:
        path = runs.run_dir(self.trainer) / runs.SAMPLES
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        log.info("Wrote %d generations to %s", len(rows), path)

    def export(self, directory: Path, merge: bool = False) -> Path:
        """A Hugging Face folder (safetensors) with the tokenizer that ``AutoModelForSeq2SeqLM`` loads;
        adapters alone (peft format) unless ``merge``."""
        return export_language_model(self, directory, merge)


def rouge(rows: list[dict[str, Any]]) -> torch.Tensor:
    """The mean ROUGE-1, -2 and -L F-measures of the rows' ``generation`` against their ``reference``."""
    from torchmetrics.functional.text.rouge import rouge_score

    found = rouge_score(
        [row["generation"] for row in rows], [row["reference"] for row in rows], rouge_keys=ROUGE_KEYS
    )
    return torch.stack([found[f"{key}_fmeasure"].float() for key in ROUGE_KEYS])


def _target_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the cross-entropies over target tokens (labels != -100), and their count."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    loss_sum = F.cross_entropy(flat, labels.reshape(-1), reduction="sum")
    return loss_sum, (labels != -100).sum()
