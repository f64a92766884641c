"""Multi-label classification: any number of labels per image or text, each decided by its own threshold."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.layout import Layout
from finetune.errors import require
from finetune.strategies import Strategy
from finetune.tasks.base import Monitor
from finetune.tasks.float_targets import FloatTargetTask

DEFAULT_THRESHOLD = 0.5
DEFAULT_SEPARATOR = "|"
# The metrics that read decisions (a probability at or above its label's threshold) rather than probabilities.
DECIDED = ("f1_micro", "f1_macro")
# Score bins of the average precision: its memory stays constant however many rows an epoch has.
AP_BINS = 200


class MultiLabelClassificationTask(FloatTargetTask):
    """Tag an image or a text with any number of labels: one sigmoid output per label.

    Data: ``ClassificationData`` with ``label_separator`` (one column, labels joined: ``toxic|obscene``) or
    ``label_columns`` (one 0/1 column per label); batches carry ``labels`` as multi-hot float ``(B, C)``.

    Loss: binary cross-entropy with logits, the mean over rows and labels (plus any registered loss terms).
    Label smoothing and MixUp/CutMix are refused (they are defined for one class per row).

    A label is predicted when its probability ``sigmoid(logit)`` is at or above its threshold: 0.5, or
    ``thresholds``; with ``tune_thresholds``, after each validation epoch of a fit each label's threshold
    becomes the one that maximises that label's F1 on that epoch's validation outputs: the midpoint between
    the lowest probability it then calls positive and the next lower one (the highest such threshold on a
    tie; a label with no positive validation row keeps its threshold). The thresholds are kept in
    checkpoints (buffer ``label_thresholds`` and hyperparameter ``thresholds``), used by ``predict`` and
    written with the export (``thresholds.json``).

    Metrics, per stage (torchmetrics, multilabel): ``f1_micro`` and ``f1_macro`` at the thresholds, ``map``
    (macro mean of the labels' average precision, over 200 score bins). With ``tune_thresholds`` the
    validation F1 is the F1 at the thresholds tuned on that same pass (an optimistic estimate; test F1 is
    not). Checkpoints follow ``val/map``.

    Predictions (``predictions.csv``): ``prediction``, the predicted labels joined by ``separator``, and
    ``p_<label>``, each label's probability.

    Distillation (``finetune.distill.Distillation``): per row, ``T² · mean over labels of KL(Bernoulli(
    sigmoid(teacher/T)) ‖ Bernoulli(sigmoid(student/T)))``, the binary KL (zero when the student matches the
    teacher); the teacher is a classifier with the same labels (a run of this task, or an export).

    Args:
        backbone: the pretrained model: ``timm:NAME``, ``hf:ID``, a local folder, or a full backbone spec.
        strategy: what trains: ``full``, ``freeze``, ``partial``, ``lora``, ``qlora`` (by name) or a strategy
            object (``class_path``/``init_args`` in a recipe).
        thresholds: each label's decision threshold, in label order; default 0.5 each.
        tune_thresholds: after each validation epoch of a fit, set each label's threshold to the one that
            maximises its F1 on the validation outputs.
        separator: joins a row's predicted labels in ``predictions.csv``; default: the data's
            ``label_separator``, else ``|``.
        **kwargs: what ``ClassificationTask`` takes (``labels``, ``image_config``, ``optimizer``,
            ``lr_scheduler``).
    """

    monitor = Monitor("val/map", "max")
    epoch_metrics = ("val/loss", "val/f1_micro", "val/f1_macro", "val/map")
    teacher_kind = "classifier"
    target_kind = "multi_label"
    problem_type = "multi_label_classification"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "full",
        thresholds: list[float] | None = None,
        tune_thresholds: bool = False,
        separator: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, **kwargs)
        require(
            thresholds is None or all(0 <= t <= 1 for t in thresholds),
            "model.thresholds",
            f"are probabilities: each in [0, 1], got {thresholds}",
        )
        require(separator is None or bool(separator), "model.separator", "is empty; give e.g. '|'")
        self.given_thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.tune_thresholds = tune_thresholds
        self.separator = separator
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.save_hyperparameters(
            dict(self.hparams)
            | {
                "thresholds": self.given_thresholds,
                "tune_thresholds": tune_thresholds,
                "separator": separator,
            }
        )

    @override
    def build_model(self) -> tuple[nn.Module, Layout]:
        model, layout = super().build_model()
        count = len(self.labels)
        thresholds = self.given_thresholds or [DEFAULT_THRESHOLD] * count
        require(
            len(thresholds) == count,
            "model.thresholds",
            f"gives {len(thresholds)} thresholds for {count} labels; give one per label, in label order",
        )
        self.register_buffer("label_thresholds", torch.tensor(thresholds, dtype=torch.float32))
        layout_of_data = getattr(self.datamodule(), "targets", None)
        self.separator = self.separator or getattr(layout_of_data, "separator", None) or DEFAULT_SEPARATOR
        self.hparams.update(self.learnt_hparams() | {"separator": self.separator})
        if self.tune_thresholds:
            # Lightning computes the metrics logged in validation_step before on_validation_epoch_end, where
            # the thresholds are tuned: validation F1 is kept apart and logged there, at the tuned thresholds.
            scores = dict(self.val_metrics.items(keep_base=True))
            self.val_metrics = _collection({n: m for n, m in scores.items() if n not in DECIDED}, "val/")
            self.val_decisions = _collection({n: m for n, m in scores.items() if n in DECIDED}, "val/")
        return model, layout

    @override
    def learnt_hparams(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds}

    @property
    def thresholds(self) -> list[float]:
        """Each label's decision threshold, in label order."""
        return self.label_thresholds.tolist()

    @override
    def describe_task(self) -> str:
        """The task, labels and head, and how labels are decided: the loss and the thresholds."""
        shown = ", ".join(f"{t:.3g}" for t in self.thresholds[:8]) + (" ..." if len(self.labels) > 8 else "")
        tuning = "; tuned on validation after each validation epoch" if self.tune_thresholds else ""
        return f"{super().describe_task()}\nloss: binary cross-entropy per label; thresholds: {shown}{tuning}"

    # --- ClassificationTask's hooks ---------------------------------------------------------------------

    @override
    def make_metrics(self, labels: list[str]) -> MetricCollection:
        """``f1_micro``, ``f1_macro`` (fed decisions at the thresholds) and ``map``."""
        count = len(labels)
        return _collection(
            {
                "f1_micro": MultilabelF1Score(num_labels=count, average="micro"),
                "f1_macro": MultilabelF1Score(num_labels=count, average="macro"),
                "map": MultilabelAveragePrecision(num_labels=count, average="macro", thresholds=AP_BINS),
            }
        )

    @override
    def task_loss(self, logits: torch.Tensor, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """Binary cross-entropy with logits, the mean over rows and labels."""
        return F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype))

    @override
    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        probabilities = logits.detach().float().sigmoid()
        targets = batch["labels"].long()
        _feed(metrics.items(keep_base=True), probabilities, targets, self.label_thresholds)
        if metrics is self.val_metrics and self.tune_thresholds:
            self._val_outputs.append((probabilities, targets))

    @override
    def predict_values(self, logits: torch.Tensor) -> torch.Tensor:
        """Each label's probability, ``sigmoid(logit)``."""
        return logits.sigmoid()

    @override
    def prediction_columns(self, values: torch.Tensor, rows: Any) -> dict[str, Any]:
        """``prediction`` (the labels at or above their thresholds, joined by ``separator``) and ``p_<label>``."""
        columns = super().prediction_columns(values, rows)
        chosen = (values.float() >= self.label_thresholds.cpu()).tolist()
        columns["prediction"] = [
            self.separator.join(label for label, on in zip(self.labels, row) if on) for row in chosen
        ]
        return columns

    @override
    def export_files(self, target: Path) -> None:
        """``labels.json`` and ``thresholds.json`` (label -> threshold: predict the label when
        ``sigmoid(logit) >= threshold``)."""
        super().export_files(target)
        thresholds = dict(zip(self.labels, self.thresholds))
        (target / "thresholds.json").write_text(json.dumps(thresholds, indent=2))

    @override
    def distillation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Per row: ``T²`` times the mean over labels of the binary KL between the teacher's and the
        student's ``sigmoid(logits / T)``."""
        return binary_kd_per_item(student, teacher, temperature)

    # --- threshold tuning --------------------------------------------------------------------------------

    @override
    def on_validation_epoch_end(self) -> None:
        """With ``tune_thresholds``: tune the thresholds on this pass's outputs (in a fit, after its sanity
        check), then log validation F1 at them."""
        outputs, self._val_outputs = self._val_outputs, []
        if not outputs:
            return
        probabilities = torch.cat([p for p, _ in outputs])
        targets = torch.cat([t for _, t in outputs])
        trainer = self.trainer
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            everyone = (_gather_rows(self, probabilities), _gather_rows(self, targets))
            self.label_thresholds.copy_(best_thresholds(*everyone, self.label_thresholds))
        _feed(self.val_decisions.items(keep_base=True), probabilities, targets, self.label_thresholds)
        self.log_dict(self.val_decisions.compute(), prog_bar=True)  # computed over every process's rows
        self.val_decisions.reset()


def _collection(metrics: dict[str, Metric], prefix: str | None = None) -> MetricCollection:
    # Members are fed different inputs (decisions or probabilities): no shared state between them.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def _feed(
    metrics: Iterable[tuple[str, Metric]],
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    thresholds: torch.Tensor,
) -> None:
    """Update named ``metrics``: the F1 scores with decisions at ``thresholds``, the others with probabilities."""
    decisions = (probabilities >= thresholds).float()
    for name, metric in metrics:
        metric.update(decisions if name in DECIDED else probabilities, targets)


def best_thresholds(
    probabilities: torch.Tensor, targets: torch.Tensor, current: torch.Tensor
) -> torch.Tensor:
    """Per label (column), the threshold that maximises its F1 when a row is called positive at
    ``probability >= threshold``: the midpoint between the lowest probability called positive and the next
    lower probability (0 below the lowest), the highest such threshold on a tie. Labels without a positive
    row keep their ``current`` threshold (every threshold scores F1 0 there)."""
    chosen = current.clone()
    for label in range(probabilities.shape[1]):
        scores, truth = probabilities[:, label], targets[:, label].float()
        positives = truth.sum()
        if positives == 0:
            continue
        order = torch.argsort(scores, descending=True, stable=True)
        ranked, hits = scores[order], torch.cumsum(truth[order], 0)
        called = torch.arange(1, len(ranked) + 1, device=ranked.device)
        f1 = 2 * hits / (called + positives)  # 2 TP / (2 TP + FP + FN), calling the top `called` rows
        # Rows of equal probability are called together: cut only where the probability drops.
        cut = torch.ones_like(ranked, dtype=torch.bool)
        cut[:-1] = ranked[:-1] > ranked[1:]
        best = int(torch.argmax(torch.where(cut, f1, -1)))
        below = ranked[best + 1] if best + 1 < len(ranked) else ranked.new_zeros(())
        chosen[label] = (ranked[best] + below) / 2
    return chosen


def binary_kd_per_item(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · mean_c [p log(p / q) + (1 - p) log((1 - p) / (1 - q))]`` per row, with ``p = sigmoid(teacher_c
    / T)`` and ``q = sigmoid(student_c / T)``; computed in float32 from the logits (stable for large ones)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    p = t.sigmoid()
    # BCE(p, q) - BCE(p, p): the cross-entropy less the teacher's own entropy.
    kl = F.binary_cross_entropy_with_logits(s, p, reduction="none") - F.binary_cross_entropy_with_logits(
        t, p, reduction="none"
    )
    return kl.mean(-1) * temperature**2


def _gather_rows(module: Any, rows: torch.Tensor) -> torch.Tensor:
    """Every process's ``rows`` (processes may hold different numbers), concatenated; ``rows`` alone in a
    single process."""
    if module.trainer.world_size == 1:
        return rows
    counts = module.all_gather(torch.tensor(len(rows), device=rows.device)).flatten().tolist()
    padded = torch.cat([rows, rows.new_zeros(max(counts) - len(rows), *rows.shape[1:])])
    gathered = module.all_gather(padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])
