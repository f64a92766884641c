"""Regression: one or several float targets per image or text, learnt standardised, predicted in their units."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.wrappers.abstract import WrapperMetric
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.layout import Layout
from finetune.data.targets import TargetStatistics
from finetune.errors import RecipeError, require
from finetune.strategies import Strategy
from finetune.tasks.base import Monitor
from finetune.tasks.float_targets import FloatTargetTask

RegressionLoss = Literal["mse", "huber"]


class RegressionTask(FloatTargetTask):
    """Predict one or several numbers per image or text: one linear output per target.

    Data: ``ClassificationData`` with ``target_columns``; batches carry ``labels`` as the targets standardised
    by the train split's mean and standard deviation, float ``(B, T)``. The model learns the standardised
    targets; the statistics are read from the data when the model is built and kept in checkpoints (buffers
    ``target_mean``/``target_std`` and hyperparameters of the same names).

    Loss: ``mse`` (the mean over rows and targets of the squared error) or ``huber`` (``huber_delta``), on the
    standardised targets, plus any registered loss terms. Label smoothing and MixUp/CutMix are refused.

    Metrics, per stage, in the targets' own units: ``mae``, ``rmse``, ``pearson``, ``spearman`` (torchmetrics),
    each computed per target and then averaged over the targets. Checkpoints follow ``val/rmse``. Spearman
    keeps an epoch's outputs until the epoch ends (rows x targets floats).

    Predictions (``predictions.csv``): ``predicted_<target>`` per target, in the target's units. The export
    gives them too, without finetune: the standardisation is folded into the head's last linear layer
    (``W' = diag(std) W``, ``b' = std * b + mean``), Hugging Face configs say ``problem_type: regression``, and
    ``targets.json`` records the names, means and standard deviations.

    Distillation (``finetune.distill.Distillation``): per row, the mean over targets of the squared difference
    between the student's and the teacher's outputs (the temperature is ignored). Both are compared as the
    models output them: take the teacher from a run of this task on the same data (its outputs are
    standardised alike); an exported model outputs the targets' units.

    Args:
        backbone: the pretrained model: ``timm:NAME``, ``hf:ID``, a local folder, or a full backbone spec.
        strategy: what trains: ``full``, ``freeze``, ``partial``, ``lora``, ``qlora`` (by name) or a strategy
            object (``class_path``/``init_args`` in a recipe).
        loss: ``mse`` or ``huber`` (squared below ``huber_delta``, linear above: robust to outliers).
        huber_delta: where the Huber loss turns linear, in standard deviations of the target.
        target_mean: each target's mean, in target order; default: the data's (train split).
        target_std: each target's standard deviation; default: the data's (train split).
        **kwargs: what ``ClassificationTask`` takes (``labels``: the target names, ``image_config``,
            ``optimizer``, ``lr_scheduler``).
    """

    monitor = Monitor("val/rmse", "min")
    epoch_metrics = ("val/loss", "val/mae", "val/rmse", "val/pearson", "val/spearman")
    teacher_kind = "classifier"
    target_kind = "regression"
    problem_type = "regression"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "full",
        loss: RegressionLoss = "mse",
        huber_delta: float = 1.0,
        target_mean: list[float] | None = None,
        target_std: list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, **kwargs)
        require(loss in ("mse", "huber"), "model.loss", f"is {loss!r}; choose mse or huber")
        require(huber_delta > 0, "model.huber_delta", f"must be above 0, got {huber_delta}")
        require(
            (target_mean is None) == (target_std is None),
            "model.target_std" if target_std is None else "model.target_mean",
            "target_mean and target_std come together; give both or neither",
        )
        self.given_statistics = None
        if target_mean is not None:
            self.given_statistics = TargetStatistics.of({"mean": target_mean, "std": target_std})
            require(
                len(target_mean) == len(target_std) and all(s > 0 for s in target_std),
                "model.target_std",
                f"needs one standard deviation above 0 per mean, got {target_std} for {target_mean}",
            )
        self.loss = loss
        self.huber_delta = huber_delta
        self.save_hyperparameters(
            dict(self.hparams)
            | {"loss": loss, "huber_delta": huber_delta, "target_mean": target_mean, "target_std": target_std}
        )

    @override
    def build_model(self) -> tuple[nn.Module, Layout]:
        model, layout = super().build_model()
        statistics = self._resolve_statistics()
        count = len(self.labels)
        if statistics is None:
            # Predicting from a checkpoint without train data: restoring the checkpoint fills them in.
            statistics = TargetStatistics((float("nan"),) * count, (float("nan"),) * count)
        require(
            len(statistics.mean) == count,
            "model.target_mean",
            f"gives {len(statistics.mean)} means for {count} targets ({self.labels}); give one per target",
        )
        self.register_buffer("target_mean", torch.tensor(statistics.mean, dtype=torch.float32))
        self.register_buffer("target_std", torch.tensor(statistics.std, dtype=torch.float32))
        self.hparams.update(self.learnt_hparams())
        return model, layout

    def _resolve_statistics(self) -> TargetStatistics | None:
        """The data's target statistics, else those given; both must agree."""
        read = getattr(self.datamodule(), "target_statistics", None)
        from_data = read() if callable(read) else None
        given = self.given_statistics
        if from_data is not None and given is not None and not from_data.close_to(given):
            raise RecipeError(
                "model.target_mean",
                f"the model's target statistics {given.plain()} differ from the data's {from_data.plain()}; "
                "drop model.target_mean and model.target_std to take the data's",
            )
        return from_data or given

    @override
    def learnt_hparams(self) -> dict[str, Any]:
        return {"target_mean": self.target_mean.tolist(), "target_std": self.target_std.tolist()}

    @override
    def describe_task(self) -> str:
        """The task, targets and head, the loss, and each target's train mean and standard deviation."""
        statistics = ", ".join(
            f"{name} {mean:.4g} ± {std:.4g}"
            for name, mean, std in zip(self.labels, self.target_mean.tolist(), self.target_std.tolist())
        )
        loss = f"huber (delta {self.huber_delta:g})" if self.loss == "huber" else "mse"
        return f"{super().describe_task()}\nloss: {loss} on targets standardised by the train mean ± std: {statistics}"

    def in_units(self, standardised: torch.Tensor) -> torch.Tensor:
        """Standardised outputs or targets ``(B, T)`` in the targets' own units, float32."""
        return standardised.float() * self.target_std + self.target_mean

    # --- ClassificationTask's hooks ---------------------------------------------------------------------

    @override
    def make_metrics(self, labels: list[str]) -> MetricCollection:
        """``mae``, ``rmse``, ``pearson`` and ``spearman``, each the mean over the targets."""
        count = len(labels)
        return MetricCollection(
            {
                "mae": TargetMean(MeanAbsoluteError(num_outputs=count)),
                "rmse": TargetMean(MeanSquaredError(squared=False, num_outputs=count)),
                "pearson": TargetMean(PearsonCorrCoef(num_outputs=count)),
                "spearman": TargetMean(SpearmanCorrCoef(num_outputs=count)),
            },
            compute_groups=False,
        )

    @override
    def task_loss(self, logits: torch.Tensor, batch: dict[str, Any], stage: str) -> torch.Tensor:
        """MSE or Huber between the outputs and the standardised targets, the mean over rows and targets."""
        targets = batch["labels"].to(logits.dtype)
        if self.loss == "huber":
            return F.huber_loss(logits, targets, delta=self.huber_delta)
        return F.mse_loss(logits, targets)

    @override
    def update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        metrics.update(self.in_units(logits.detach()), self.in_units(batch["labels"]))

    @override
    def predict_values(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted targets in their own units."""
        return self.in_units(logits)

    @override
    def prediction_columns(self, values: torch.Tensor, rows: Any) -> dict[str, Any]:
        """``predicted_<target>`` per target (beside the data's own target columns, when it has them)."""
        values = values.float()
        return {f"predicted_{name}": values[:, i].numpy() for i, name in enumerate(self.labels)}

    @override
    def export_files(self, target: Path) -> None:
        """``labels.json`` (the target names) and ``targets.json`` (names, means and standard deviations)."""
        super().export_files(target)
        record = {"names": self.labels, "mean": self.target_mean.tolist(), "std": self.target_std.tolist()}
        (target / "targets.json").write_text(json.dumps(record, indent=2))

    @override
    def distillation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """Per row, the mean over targets of ``(student - teacher)²``; ``temperature`` is ignored."""
        return (student.float() - teacher.float()).pow(2).mean(-1)

    # --- statistics in use --------------------------------------------------------------------------------

    @override
    def on_validation_start(self) -> None:
        self._require_statistics()

    @override
    def on_test_start(self) -> None:
        self._require_statistics()

    @override
    def on_predict_start(self) -> None:
        self._require_statistics()

    def _require_statistics(self) -> None:
        require(
            not bool(torch.isnan(self.target_std).any()),
            "data.train",
            "the model has no target statistics (the train mean and std); set data.train as in training, "
            "or give the trained checkpoint (ckpt_path)",
        )

    @override
    def export(self, directory: Path, merge: bool = False) -> Path:
        """As ``ClassificationTask.export``, with the standardisation folded into the head's last linear layer
        of the written model (so that it outputs the targets' units), and ``targets.json``."""
        self._require_statistics()
        with folded(
            output_layer(self.model, self.layout, len(self.labels)), self.target_mean, self.target_std
        ):
            return super().export(directory, merge)


class TargetMean(WrapperMetric):
    """A metric of ``num_outputs`` targets, computed per target and averaged into one number; inputs are
    ``(N, T)`` (a single target's ``(N, 1)`` is fed as ``(N,)``, as torchmetrics wants it)."""

    def __init__(self, metric: Metric) -> None:
        super().__init__()
        self.metric = metric

    @override
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.shape[-1] == 1:
            preds, target = preds[:, 0], target[:, 0]
        self.metric.update(preds, target)

    @override
    def compute(self) -> torch.Tensor:
        return self.metric.compute().float().mean()

    @override
    def reset(self) -> None:
        self.metric.reset()
        super().reset()


def output_layer(model: nn.Module, layout: Layout, outputs: int) -> nn.Linear:
    """The last ``nn.Linear`` with ``outputs`` outputs among the head's modules: the layer whose outputs are
    the model's."""
    found = [
        module
        for name in layout.head
        for module in model.get_submodule(name).modules()
        if isinstance(module, nn.Linear) and module.out_features == outputs
    ]
    if not found or found[-1].bias is None:
        raise TypeError(
            f"the head ({', '.join(layout.head)}) ends in no linear layer with a bias and {outputs} outputs"
        )
    return found[-1]


@contextmanager
def folded(layer: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> Iterator[None]:
    """Within the block, ``layer`` computes ``std * (W x + b) + mean`` (``W' = diag(std) W``,
    ``b' = std * b + mean``); afterwards its weights are exactly what they were."""
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(std.to(weight)[:, None])
        layer.bias.mul_(std.to(bias)).add_(mean.to(bias))
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
