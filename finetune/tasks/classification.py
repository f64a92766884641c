"""Image and text classification on a pretrained timm or Hugging Face backbone."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.base import ImageConfig
from finetune.backbones.heads import Head, PooledClassifier
from finetune.backbones.layout import Layout, discover_layout
from finetune.batch import model_inputs
from finetune.data.transforms import TARGETS
from finetune.errors import RecipeError, require
from finetune.export import write_atomically, write_model
from finetune.strategies import Strategy
from finetune.strategies.adapters import has_adapters, save_adapter
from finetune.tasks.base import FinetuneTask, Monitor
from finetune.tasks.loss_terms import StepOutputs


class ClassificationTask(FinetuneTask):
    """Classify images or text: a pretrained backbone, a new head sized to the labels, a fine-tuning strategy.

    The model is built in ``configure_model`` once the labels are known: from ``labels`` when given,
    else from the datamodule's ``labels``. Batches are dicts of model inputs plus ``labels`` and ``index``.
    Logs ``{train,val,test}/loss``, ``/acc`` and ``/f1`` (macro). The training loss is cross-entropy plus
    any registered loss terms (``finetune.tasks.loss_terms``; per-sample means, ``reduction="mean"``).

    A training batch mixed by MixUp/CutMix (``ImageClassificationData(mixup=..., cutmix=...)``) also
    carries soft ``targets`` ``(B, C)``: its loss is the soft-target cross-entropy ``mean(-Σ t·log p)``
    (timm's ``SoftTargetCrossEntropy``), with ``label_smoothing`` applied to ``t`` as timm's ``Mixup``
    applies it; metrics stay on the original ``labels``. Loss terms see the same mixed batch.

    Args:
        backbone: the pretrained model: ``timm:NAME``, ``hf:ID``, a local folder, or a full backbone spec.
        strategy: what trains: ``full``, ``freeze``, ``partial`` (by name, default arguments) or a
            strategy object (``class_path``/``init_args`` in a recipe).
        labels: class names in index order; default: the datamodule's labels.
        label_smoothing: cross-entropy label smoothing (of soft MixUp/CutMix targets too).
        head: the classification head (``finetune.backbones.heads.Head``): ``pooling`` (Hugging Face:
            ``cls``, ``pooler``, ``mean``, ``max``, ``last``; timm: its ``global_pool``), ``dropout``,
            ``hidden``. Default: the model's own head; a sentence-transformers folder pools as it was
            trained to (e.g. ``mean``).
        image_config: how evaluation prepares images, which the export records (image data); default: the
            datamodule's ``image_config()``, read when the model is built and kept in checkpoints. Give it
            only to rebuild a task without its data.
        **kwargs: ``optimizer`` and ``lr_scheduler``, as ``FinetuneTask`` takes them.
    """

    monitor = Monitor("val/acc", "max")
    epoch_metrics = ("val/loss", "val/acc", "val/f1")
    teacher_kind = "classifier"
    # The targets the task trains on (``finetune.data.targets``): one class per row; the data is checked.
    target_kind: ClassVar[str] = "class"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "full",
        labels: list[str] | None = None,
        label_smoothing: float = 0.0,
        head: Head | None = None,
        image_config: ImageConfig | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, **kwargs)
        require(
            0 <= label_smoothing < 1, "model.label_smoothing", f"must be in [0, 1), got {label_smoothing}"
        )
        self.labels = list(labels) if labels is not None else None
        self.label_smoothing = label_smoothing
        self.head = Head.of(head)
        self.image_config = ImageConfig.of(image_config) if image_config is not None else None
        self.save_hyperparameters(
            self.base_hparams()
            | {
                "labels": self.labels,
                "label_smoothing": label_smoothing,
                "head": self.head.plain() if self.head is not None else None,
                "image_config": self._plain_image(),
            }
        )

    def _plain_image(self) -> dict[str, Any] | None:
        return self.image_config.plain() if self.image_config is not None else None

    def build_model(self) -> tuple[nn.Module, Layout]:
        datamodule = self.datamodule()
        check = getattr(datamodule, "check_task", None)
        if callable(check):
            check(self.target_kind, type(self).__name__)
        labels = self._resolve_labels()
        classifier = self.backbone.load_classifier(labels, self.strategy.load_options(), head=self.head)
        self.labels = labels
        self.hparams["labels"] = labels
        self.image_config = self._resolve_image_config()
        self.hparams["image_config"] = self._plain_image()
        metrics = self.make_metrics(labels)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        return classifier.model, discover_layout(classifier.model, classifier.head)

    @override
    def describe_task(self) -> str:
        """The task line, the labels, and the head: the model's own or the recipe's pooling head."""
        labels = self.labels or []
        shown = ", ".join(labels[:8]) + (f" ... ({len(labels)})" if len(labels) > 8 else "")
        lines = [super().describe_task(), f"labels: {shown}"]
        if isinstance(self.model, PooledClassifier):
            spec = self.model.spec
            hidden = f", hidden layer {spec.hidden}" if spec.hidden else ""
            lines.append(f"head: {self.model.pooling} pooling, dropout {spec.dropout:g}{hidden}, then linear")
        elif self.head is not None and self.head.pooling is not None:
            lines.append(
                f"head: {self.head.pooling} pooling (timm global_pool), dropout {self.head.dropout:g}"
            )
        else:
            lines.append("head: the model's own, new for these labels")
        return "\n".join(lines)

    # --- what subclasses for other targets (multi-label, regression) change ----------------------------

    def make_metrics(self, labels: list[str]) -> MetricCollection:
        """The metrics logged per stage (``<stage>/<name>``): accuracy (the share of rows predicted right)
        and macro F1."""
        return MetricCollection(
            {
                # torchmetrics' default for MulticlassAccuracy is average="macro": the mean of per-class
                # recalls, not accuracy (found by bench.parity: 0.06 below the hand loop's accuracy).
                "acc": MulticlassAccuracy(num_classes=len(labels), average="micro"),
                "f1": MulticlassF1Score(num_classes=len(labels), average="macro"),
            }
        )

    def task_loss(self, logits: torch.Tensor, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """Cross-entropy on the class ids, or on MixUp/CutMix's soft ``targets`` in training; smoothed."""
        targets = batch[TARGETS] if stage == "train" and TARGETS in batch else batch["labels"]
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        """Feed one batch to ``metrics`` (always the original ``labels``, never mixed targets)."""
        metrics.update(logits.detach(), batch["labels"])

    def predict_values(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``predict`` keeps per row (``PredictionWriter``): the class probabilities."""
        return logits.softmax(-1)

    def prediction_columns(self, values: torch.Tensor, rows: Any) -> dict[str, Any]:
        """Output columns for rows' ``predict_values``: ``prediction`` (the likeliest label) and
        ``p_<label>`` per class."""
        values = values.float()
        columns: dict[str, Any] = {"prediction": [self.labels[i] for i in values.argmax(-1).tolist()]}
        for i, label in enumerate(self.labels):
            columns[f"p_{label}"] = values[:, i].numpy()
        return columns

    def export_files(self, target: Path) -> None:
        """Files written beside the exported model: ``labels.json``."""
        (target / "labels.json").write_text(json.dumps(self.labels, indent=2))

    # --- building ---------------------------------------------------------------------------------------

    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        labels = self.labels or self._resolve_labels()
        return self.backbone.load_classifier(labels, options, head=self.head).model

    def _resolve_labels(self) -> list[str]:
        datamodule = self.datamodule()
        data_labels = (
            list(datamodule.labels) if datamodule is not None and hasattr(datamodule, "labels") else None
        )
        if self.labels is None and data_labels is None:
            raise RecipeError(
                "model.labels", "no labels known: give model labels or a datamodule with labels"
            )
        if self.labels is not None and data_labels is not None and self.labels != data_labels:
            raise RecipeError(
                "model.labels",
                f"the model's labels {self.labels} differ from the data's {data_labels}; "
                "make them the same (or drop model.labels to take the data's)",
            )
        return self.labels if self.labels is not None else data_labels

    def _resolve_image_config(self) -> ImageConfig | None:
        """The datamodule's evaluation image preparation when it has one, else the one given."""
        datamodule = self.datamodule()
        image_config = getattr(datamodule, "image_config", None)
        return image_config() if callable(image_config) else self.image_config

    @override
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits for a batch."""
        return self.loader.logits(self.model, _model_inputs(batch))

    def forward_features(
        self, batch: dict[str, Any], names: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class logits and the named features (``pooled``, ``hidden.N``) of one forward pass."""
        if not names:
            return self(batch), {}
        return self.loader.features(self.model, _model_inputs(batch), names)

    def _shared_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        logits, features = self.forward_features(batch, self.requested_features() if stage == "train" else ())
        loss = self.task_loss(logits, batch, stage)
        batch_size = len(batch["labels"])
        if stage == "train":
            outputs = StepOutputs(logits=logits, batch=batch, task_loss=loss, features=features)
            loss = self.total_loss(outputs, batch_size)
        else:
            self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        metrics = getattr(self, f"{stage}_metrics")
        self.update_metrics(metrics, logits, batch)
        self.log_dict(metrics, prog_bar=stage != "train", batch_size=batch_size, on_epoch=True, on_step=False)
        return loss

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return {"index": batch["index"], "values": self.predict_values(self(batch))}

    def export(self, directory: Path, merge: bool = False) -> Path:
        """Write the model in its native format (HF folder or timm config + safetensors) with ``labels.json``;
        an image model's export records ``image_config``, so that it preprocesses as validation did. A
        recipe-chosen head on a Hugging Face model (``PooledClassifier``) is the base model's folder
        (``AutoModel``) plus ``head.safetensors`` and ``head.json``.

        Under an adapter strategy the adapters alone are written, in peft's format, unless ``merge``.
        """

        def save_plain(model: Any, target: Path) -> None:
            self.loader.export(model, target, self.labels, self.backbone, image=self.image_config)

        def write(target: Path) -> None:
            if isinstance(self.model, PooledClassifier) and has_adapters(self.model) and not merge:
                # peft loads adapters onto AutoModel (the encoder); the head beside them, as in plain exports.
                save_adapter(self.model, target, base_model=self.backbone.name, root="encoder")
                self.model.save_head(target, self.labels)
            else:
                write_model(self, target, merge, save_plain)
            self.export_files(target)

        return write_atomically(directory, write)


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model inputs of a batch: neither ``labels``, ``index`` nor MixUp's soft ``targets``."""
    return {key: value for key, value in model_inputs(batch).items() if key != TARGETS}
