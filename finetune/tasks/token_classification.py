"""Token classification (named entities, parts of speech) on a pretrained Hugging Face encoder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.layout import Layout, discover_layout
from finetune.batch import INDEX, LABELS, model_inputs
from finetune.data.sentences import TAGS, TOKENS
from finetune.data.tagging import OUTSIDE
from finetune.data.word_tokens import IGNORE, WORD_IDS
from finetune.errors import RecipeError
from finetune.export import write_atomically, write_model
from finetune.strategies import Strategy
from finetune.tasks.base import FinetuneTask, Monitor
from finetune.tasks.loss_terms import StepOutputs


class TokenClassificationTask(FinetuneTask):
    """Tag every word: a pretrained Hugging Face encoder, a new per-token head sized to the tags, a strategy.

    The model (``AutoModelForTokenClassification``) is built in ``configure_model`` once the tags are known:
    ``labels`` when given, else the datamodule's (``finetune.data.tagging.TokenTaggingData``). Batches
    carry the data's token inputs, ``labels`` (per token: the word's tag id on its first sub-token, -100
    elsewhere), ``index`` and, when predicting, ``word_ids``.

    Loss: cross-entropy over the labelled tokens (ignore index -100), their mean in each batch (under
    gradient accumulation, the mean of the micro-batches' means). Registered loss terms (distillation,
    ``finetune.tasks.loss_terms``) see the ``(B, L, C)`` token logits with ``mask`` marking the labelled
    tokens, so the default ``distillation_loss`` (``T² · KL`` per position) is averaged over those tokens.

    Metrics, per word (the prediction of its first sub-token): ``{val,test}/precision``, ``/recall`` and
    ``/f1`` of whole entities, micro-averaged over entity types, as ``seqeval`` computes them by default
    (conlleval's rules, not strict IOB2: an entity starts at ``B-X``, or at an ``I-X`` that does not continue
    an ``X``; ``E-``/``S-`` tags are read too); ``/acc``, the share of words tagged right; ``/loss``, the mean
    over labelled tokens. Entity scores need IOB-style tags; with other tag sets (parts of speech) watch
    ``val/acc``. Words are collected over the epoch, from every process under DDP, and scored once.

    Predictions (``PredictionWriter``): per sentence, ``tags`` (one tag per word, space-joined) and
    ``entities`` (a JSON list of ``{"type", "start", "end", "text"}``, word indices, ``end`` exclusive);
    ``tokens`` (and gold tags, as ``gold_tags``) are written space-joined. Words the model did not see (cut by
    ``data.max_length``) are tagged ``O``.

    Args:
        backbone: a Hugging Face encoder (BERT, RoBERTa, DeBERTa ...): ``hf:ID``, a local folder, or a full
            backbone spec.
        strategy: what trains: ``full``, ``freeze``, ``partial``, ``lora``, ``qlora`` (by name, default
            arguments) or a strategy object (``class_path``/``init_args`` in a recipe).
        labels: the tags in id order; default: the datamodule's labels.
        **kwargs: ``optimizer`` and ``lr_scheduler``, as ``FinetuneTask`` takes them.
    """

    monitor = Monitor("val/f1", "max")
    epoch_metrics = ("val/loss", "val/precision", "val/recall", "val/f1", "val/acc")
    teacher_kind = "token_classifier"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "full",
        labels: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, **kwargs)
        self.labels = [str(label) for label in labels] if labels is not None else None
        self.save_hyperparameters(self.base_hparams() | {"labels": self.labels})

    # --- building -----------------------------------------------------------------------------------------

    def build_model(self) -> tuple[nn.Module, Layout]:
        labels = self._resolve_labels()
        classifier = self.backbone.load_classifier(labels, self.strategy.load_options(), per_token=True)
        self.labels = labels
        self.hparams["labels"] = labels
        self.val_scores = EntityScores(labels)
        self.test_scores = EntityScores(labels)
        return classifier.model, discover_layout(classifier.model, classifier.head)

    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        labels = self.labels or self._resolve_labels()
        return self.backbone.load_classifier(labels, options, per_token=True).model

    @override
    def describe_task(self) -> str:
        """The task line, the tags and the head, for the run plan."""
        tags = self.labels or []
        shown = ", ".join(tags[:12]) + (f" ... ({len(tags)})" if len(tags) > 12 else "")
        head = "head: the model's own, a new linear layer on every token's last hidden state"
        return "\n".join([super().describe_task(), f"tags: {shown}", head])

    def _resolve_labels(self) -> list[str]:
        datamodule = self.datamodule()
        data_labels = list(datamodule.labels) if hasattr(datamodule, "labels") else None
        if self.labels is None and data_labels is None:
            raise RecipeError("model.labels", "no tags known: give model labels or a datamodule with labels")
        if self.labels is not None and data_labels is not None and self.labels != data_labels:
            raise RecipeError(
                "model.labels",
                f"the model's tags {self.labels} differ from the data's {data_labels}; "
                "make them the same (or drop model.labels to take the data's)",
            )
        return self.labels if self.labels is not None else data_labels

    # --- steps --------------------------------------------------------------------------------------------

    @override
    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Token logits ``(B, L, C)`` for a batch."""
        return self.loader.logits(self.model, _model_inputs(batch))

    def forward_features(
        self, batch: Mapping[str, Any], names: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Token logits and the named features (``pooled``, ``hidden.N``) of one forward pass."""
        if not names:
            return self(batch), {}
        return self.loader.features(self.model, _model_inputs(batch), names)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the labelled tokens (label -100: none), their mean (0 when there are none)."""
        summed = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        return summed / (labels != IGNORE).sum().clamp(min=1)

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, features = self.forward_features(batch, self.requested_features())
        labels = batch[LABELS]
        loss = self.task_loss(logits, labels)
        outputs = StepOutputs(logits, batch, loss, mask=labels != IGNORE, features=features)
        return self.total_loss(outputs, len(labels))

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch)
        labels = batch[LABELS]
        # Weighted by labelled tokens, the epoch's loss is the mean over all of them.
        tokens = max(int((labels != IGNORE).sum()), 1)
        loss = self.task_loss(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=tokens, sync_dist=True)
        getattr(self, f"{stage}_scores").update(logits.detach(), labels)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _log_scores(self, stage: str) -> None:
        scores = getattr(self, f"{stage}_scores")
        values = scores.compute()
        scores.reset()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=True)

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per row: ``index``, and ``values``, each word's predicted tag id (-1: no word, or a word without
        a token), as wide as the batch's ``word_ids``."""
        return {"index": batch[INDEX], "values": word_predictions(self(batch).argmax(-1), batch[WORD_IDS])}

    def prediction_columns(self, values: torch.Tensor, rows: Any) -> dict[str, Any]:
        """Output columns for rows' word predictions: ``tokens`` (and ``gold_tags`` when the rows have tags)
        space-joined, ``tags`` (one per word, ``O`` for words the model did not see) and ``entities``."""
        sentences = [list(words) for words in rows[TOKENS]]
        tags, entities = [], []
        for ids, words in zip(values.tolist(), sentences):
            ids = ids[: len(words)] + [-1] * (len(words) - len(ids))
            names = [self.labels[i] if i >= 0 else OUTSIDE for i in ids]
            tags.append(" ".join(names))
            entities.append(json.dumps(entity_spans(names, words), ensure_ascii=False))
        columns: dict[str, Any] = {TOKENS: [" ".join(words) for words in sentences]}
        if TAGS in rows:
            columns["gold_tags"] = [" ".join(gold) for gold in rows[TAGS]]
        return columns | {"tags": tags, "entities": entities}

    # --- export -------------------------------------------------------------------------------------------

    def export(self, directory: Path, merge: bool = False) -> Path:
        """Write a Hugging Face folder (``AutoModelForTokenClassification`` with ``id2label``/``label2id``,
        the tokenizer) and ``labels.json``. Under an adapter strategy the adapters alone are written, in
        peft's format, unless ``merge``."""

        def save_plain(model: Any, target: Path) -> None:
            self.loader.export(model, target, self.labels, self.backbone)

        def write(target: Path) -> None:
            write_model(self, target, merge, save_plain)
            (target / "labels.json").write_text(json.dumps(self.labels, ensure_ascii=False, indent=2))

        return write_atomically(directory, write)


class EntityScores(Metric):
    """Entity precision, recall and F1 (``seqeval``, micro average, default mode) and word accuracy over
    every sentence seen since the last ``reset``.

    ``update(logits, labels)`` keeps, per sentence, the predicted and gold tag ids of its labelled tokens
    (labels != -100: the first sub-token of each word). The states are lists concatenated across processes
    (``dist_reduce_fx="cat"``), so under DDP ``compute`` scores the sentences of every process. Scores
    without any predicted (or gold) entity are 0.
    """

    full_state_update = False

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        self.labels = list(labels)
        self.add_state("predicted", default=[], dist_reduce_fx="cat")
        self.add_state("gold", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        kept = labels != IGNORE
        self.predicted.append(logits.argmax(-1)[kept])
        self.gold.append(labels[kept])
        self.lengths.append(kept.sum(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        from seqeval.metrics import f1_score, precision_score, recall_score

        if not len(self.lengths):
            return {name: torch.tensor(0.0) for name in ("precision", "recall", "f1", "acc")}
        predicted, gold, lengths = (
            dim_zero_cat(state).cpu() for state in (self.predicted, self.gold, self.lengths)
        )
        names = np.asarray(self.labels, dtype=object)
        sizes = lengths.tolist()
        true = [names[part.numpy()].tolist() for part in torch.split(gold, sizes)]
        guessed = [names[part.numpy()].tolist() for part in torch.split(predicted, sizes)]
        scores = {
            "precision": precision_score(true, guessed, zero_division=0),
            "recall": recall_score(true, guessed, zero_division=0),
            "f1": f1_score(true, guessed, zero_division=0),
        }
        accuracy = (predicted == gold).float().mean() if len(gold) else torch.tensor(0.0)
        return {name: torch.tensor(float(value)) for name, value in scores.items()} | {"acc": accuracy}


def word_predictions(predicted: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """Per-token predictions ``(B, L)`` to per-word ones ``(B, W)`` (``W``: the width of ``word_ids``, at
    least ``L``): word ``w`` takes its first sub-token's prediction; -1 where no token starts a word."""
    words = word_ids[:, : predicted.shape[1]]
    first = words >= 0
    first[:, 1:] &= words[:, 1:] != words[:, :-1]
    rows, positions = first.nonzero(as_tuple=True)
    # int32: what every process group can gather (NCCL has no int16).
    values = torch.full(word_ids.shape, -1, dtype=torch.int32, device=predicted.device)
    values[rows, words[rows, positions]] = predicted[rows, positions].int()
    return values


def entity_spans(tags: list[str], words: list[str]) -> list[dict[str, Any]]:
    """A sentence's entities as ``seqeval`` reads its tags: type, first word, end (exclusive), text."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [
        {"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start : end + 1])}
        for kind, start, end in get_entities(tags)
    ]


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model inputs of a batch: neither ``labels``, ``index`` nor ``word_ids``."""
    return {key: value for key, value in model_inputs(batch).items() if key != WORD_IDS}
