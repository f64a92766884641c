"""The loss-term contract: how code outside a task (a distillation callback) adds to its training loss.

A Lightning callback cannot replace the loss ``training_step`` returns, so every ``FinetuneTask`` computes
its training loss through this small contract instead:

1. A *loss term* is any object with a ``name`` (it logs as ``train/<name>_loss``), a tuple ``features`` of
   the student features it needs (``"pooled"``, ``"hidden.N"``; empty for logits only), and
   ``__call__(outputs: StepOutputs) -> LossContribution``.
2. Register it with ``task.add_loss_term(term, module=None)``, typically from a callback's ``setup``
   (before ``configure_optimizers`` runs). A ``module`` the term trains (a feature projection) becomes a
   submodule of the task under ``loss_modules.<name>``: it is in the optimizer (one group at the head's
   level), in checkpoints (so a resumed run continues it), and never in an export.
3. In each training step the task runs one forward pass producing its logits and the requested features,
   computes its own loss, and calls every term with the step's ``StepOutputs``. The loss it returns is::

       loss = (product of the terms' task_weight) * task_loss + sum of the terms' loss

   and it logs ``train/task_loss``, ``train/<name>_loss`` for each term (the contribution as added) and
   ``train/loss`` (the total). Validation and test losses stay the task's own.

Reductions: with ``reduction="mean"`` (classification) losses are means over the batch's samples. With
``reduction="sum"`` (token-level tasks, see ``finetune.optim.TokenNormalizedLoss``) every loss is a *sum*
over the target positions marked by ``mask``; the task divides the total by the optimizer step's token
count, so a term's contribution must be a sum over the same positions to compose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum"]


@dataclass
class StepOutputs:
    """What a training step computed, as loss terms see it.

    Args:
        logits: class logits ``(B, C)``, or token logits ``(B, L, V)`` over the batch's full sequences
            (position ``t`` predicts token ``t + 1``).
        batch: the batch as the task received it (model inputs, ``labels``, ``index`` ...).
        task_loss: the task's own loss, reduced as ``reduction`` says.
        reduction: ``mean`` over samples, or ``sum`` over the positions ``mask`` marks.
        mask: token tasks: ``(B, L)`` bool, the positions of ``logits`` whose prediction is a target;
            None for per-sample tasks.
        features: the student features the terms asked for, by name.
    """

    logits: torch.Tensor
    batch: Mapping[str, torch.Tensor]
    task_loss: torch.Tensor
    reduction: Reduction = "mean"
    mask: torch.Tensor | None = None
    features: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossContribution:
    """A term's part of the total: ``loss`` is added; the task loss is multiplied by ``task_weight``."""

    loss: torch.Tensor
    task_weight: float = 1.0


class LossTerm(Protocol):
    """See the module docstring."""

    name: str
    features: tuple[str, ...]

    def __call__(self, outputs: StepOutputs) -> LossContribution: ...


def reduce(per_item: torch.Tensor, outputs: StepOutputs, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-sample ``(B,)`` or per-position ``(B, L)`` losses the way ``outputs`` reduces its task loss.

    Per-position losses count where ``mask`` (default ``outputs.mask``) is true: their sum under
    ``reduction="sum"``, their mean otherwise. Per-sample losses: sum or mean over the batch.
    """
    if per_item.ndim == 1:
        return per_item.sum() if outputs.reduction == "sum" else per_item.mean()
    mask = outputs.mask if mask is None else mask
    if mask is None:
        return per_item.sum() if outputs.reduction == "sum" else per_item.mean()
    kept = per_item[mask.bool()]
    return kept.sum() if outputs.reduction == "sum" else kept.sum() / mask.sum().clamp(min=1)


def kd_per_item(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dimension, per sample/position:
    the distillation loss of tasks whose logits are one softmax (``FinetuneTask.distillation_loss``).

    Computed in float32 whatever the logits' dtype (a bfloat16 teacher, a half-precision student). When
    the vocabularies' padded sizes differ (same tokenizer, different embedding padding) the extra
    columns, which no token uses, are dropped.
    """
    width = min(student.shape[-1], teacher.shape[-1])
    log_student = F.log_softmax(student[..., :width].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[..., :width].float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="none").sum(-1)
    return kl * temperature**2
