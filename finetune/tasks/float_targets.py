"""What the tasks whose batches' ``labels`` are float rows (multi-label, regression) add to ``ClassificationTask``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import nn
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.layout import Layout
from finetune.data.targets import TargetKind
from finetune.errors import require
from finetune.strategies import Strategy
from finetune.tasks.classification import ClassificationTask


class FloatTargetTask(ClassificationTask):
    """A ``ClassificationTask`` with one output per label or target, trained on float ``labels`` ``(B, W)``.

    Subclasses declare the data they take (``target_kind``, checked against the datamodule's when the model
    is built, and by the data when it is set up) and the ``problem_type`` written into a Hugging Face model's
    config (so that an export says how to read its outputs). Label smoothing and MixUp/CutMix smooth or mix
    one-class targets; these tasks refuse them (the data refuses ``mixup``/``cutmix``).

    What the task learns besides weights (thresholds, target statistics) is held in buffers, so that every
    way of restoring a checkpoint restores it, and written into the checkpoint's hyperparameters
    (``learnt_hparams``), so that ``finetune.runs.load_checkpoint`` rebuilds the task with it.

    Args:
        backbone: the pretrained model: ``timm:NAME``, ``hf:ID``, a local folder, or a full backbone spec.
        strategy: what trains: ``full``, ``freeze``, ``partial``, ``lora``, ``qlora`` (by name) or a strategy
            object (``class_path``/``init_args`` in a recipe).
        **kwargs: what ``ClassificationTask`` takes (``labels``, ``image_config``, ``optimizer``,
            ``lr_scheduler``).
    """

    target_kind: ClassVar[TargetKind]
    problem_type: ClassVar[str]

    def __init__(self, backbone: str | Backbone, strategy: str | Strategy = "full", **kwargs: Any) -> None:
        super().__init__(backbone, strategy, **kwargs)
        require(
            self.label_smoothing == 0,
            "model.label_smoothing",
            f"smooths one-class targets; {type(self).__name__} takes none: leave it 0",
        )

    def learnt_hparams(self) -> dict[str, Any]:
        """The hyperparameters the task learns (from its buffers), as plain data."""
        return {}

    @override
    def build_model(self) -> tuple[nn.Module, Layout]:
        model, layout = super().build_model()
        self._mark_problem_type(model)
        return model, layout

    @override
    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        model = super().load_backbone(options)
        self._mark_problem_type(model)
        return model

    def _mark_problem_type(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)  # Hugging Face models; timm models have no problem type
        if config is not None:
            config.problem_type = self.problem_type

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        learnt = self.learnt_hparams()
        self.hparams.update(learnt)
        checkpoint.setdefault(self.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(learnt)
