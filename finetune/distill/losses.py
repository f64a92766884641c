"""Distillation losses and the loss terms (``finetune.tasks.loss_terms``) that add them to a task's loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import RecipeError
from finetune.tasks.loss_terms import LossContribution, StepOutputs, kd_per_item, reduce

KEY = "trainer.callbacks.Distillation"


@dataclass
class FeatureMatch:
    """Match a student feature to a teacher feature (names: ``pooled``, ``hidden.N``; see
    ``finetune.backbones.base.FEATURES``). When their widths differ, a learned linear projection maps the
    student's to the teacher's width; it trains with the student and is not exported.

    Args:
        student: the student's feature.
        teacher: the teacher's feature.
        loss: ``mse`` (mean over the feature dimension) or ``cosine`` (1 - cosine similarity).
        weight: the match's weight in the total loss.
    """

    student: str = "pooled"
    teacher: str = "pooled"
    loss: Literal["mse", "cosine"] = "mse"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in FEATURE_LOSSES:
            raise RecipeError(
                f"{KEY}.features", f"loss {self.loss!r} is not one of: {', '.join(FEATURE_LOSSES)}"
            )
        if self.weight < 0:
            raise RecipeError(f"{KEY}.features", f"weight must be >= 0, got {self.weight}")


@dataclass
class TeacherOutputs:
    """The teacher's logits for the step's batch (and the features the matches name)."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def _mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).pow(2).mean(-1)


def _cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(student, teacher, dim=-1)


FEATURE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse,
    "cosine": _cosine,
}


class LogitKD:
    """Loss term ``kd``: adds ``(1 - alpha) · per_item(student, teacher, T)`` (default ``T² · KL``, the task's
    ``distillation_loss``) and weights the task loss by ``alpha``.

    ``teacher`` returns the current step's ``TeacherOutputs`` (the callback computes them once per batch).
    Token tasks (``reduction="sum"``) sum the KL over the masked (response) positions.
    """

    name = "kd"
    features: tuple[str, ...] = ()

    def __init__(
        self,
        teacher: Callable[[], TeacherOutputs],
        alpha: float,
        temperature: float,
        per_item: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = kd_per_item,
    ) -> None:
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.per_item = per_item

    def __call__(self, outputs: StepOutputs) -> LossContribution:
        per_item = self.per_item(outputs.logits, self.teacher().logits, self.temperature)
        return LossContribution((1 - self.alpha) * reduce(per_item, outputs), task_weight=self.alpha)


class FeatureKD:
    """Loss term ``feature``: ``sum of weight · loss(projection(student feature), teacher feature)``.

    ``projections`` (one per match: ``nn.Linear`` when widths differ, else ``nn.Identity``) is the module
    the task registers with the term, so it trains. Per-token features count where the step's ``mask``
    is set (token tasks), else where the batch's ``attention_mask`` is.
    """

    name = "feature"

    def __init__(
        self,
        teacher: Callable[[], TeacherOutputs],
        matches: list[FeatureMatch],
        widths: list[tuple[int, int]],
    ) -> None:
        self.teacher = teacher
        self.matches = matches
        self.features = tuple(dict.fromkeys(match.student for match in matches))
        self.projections = nn.ModuleList(
            nn.Linear(student, teacher) if student != teacher else nn.Identity()
            for student, teacher in widths
        )

    def __call__(self, outputs: StepOutputs) -> LossContribution:
        teacher = self.teacher().features
        mask = outputs.mask
        if mask is None and isinstance(outputs.batch, Mapping):
            mask = outputs.batch.get("attention_mask")
        total = outputs.logits.new_zeros((), dtype=torch.float32)
        for match, projection in zip(self.matches, self.projections):
            student = projection(outputs.features[match.student].float())
            target = teacher[match.teacher].float()
            if student.shape != target.shape:
                raise RecipeError(
                    f"{KEY}.features",
                    f"student {match.student} {tuple(student.shape)} and teacher {match.teacher} "
                    f"{tuple(target.shape)} differ in shape beyond their width; match pooled features, or "
                    "hidden states of models that share a tokenizer",
                )
            per_item = FEATURE_LOSSES[match.loss](student, target)
            total = total + match.weight * reduce(per_item, outputs, mask if per_item.ndim == 2 else None)
        return LossContribution(total)
