"""The loss-term contract: how code outside a module (a distillation callback) adds to its training loss.

A Lightning callback cannot replace the loss ``training_step`` returns, so a module that takes loss terms
computes its training loss through this small contract, which ``LossTermsMixin`` implements (every
``FinetuneTask`` inherits it; so can your own ``LightningModule``):

1. A *loss term* is any object with a ``name`` (it logs as ``train/<name>_loss``), a tuple ``features`` of
   the student features it needs (``"pooled"``, ``"hidden.N"``; empty for logits only), and
   ``__call__(outputs: StepOutputs) -> LossContribution``.
2. Register it with ``module.add_loss_term(term, module=None)``, typically from a callback's ``setup``
   (before ``configure_optimizers`` runs). A ``module`` the term trains (a feature projection) becomes a
   submodule under ``loss_modules.<name>``: it is in the optimizer (``self.parameters()``, or one group at
   the head's level in finetune's groups), in checkpoints (so a resumed run continues it), and never in an
   export.
3. In each training step the module runs one forward pass producing its logits (and, in finetune's tasks,
   the requested features), computes its own loss, and returns ``self.total_loss(...)``, which calls every
   term with the step's ``StepOutputs``. The loss it returns is::

       loss = (product of the terms' task_weight) * task_loss + sum of the terms' loss

   and it logs ``train/task_loss``, ``train/<name>_loss`` for each term (the contribution as added) and
   ``train/loss`` (the total). Validation and test losses stay the module's own.

Reductions: with ``reduction="mean"`` (classification) losses are means over the batch's samples. With
``reduction="sum"`` (token-level tasks, see ``finetune.optim.TokenNormalizedLoss``) every loss is a *sum*
over the target positions marked by ``mask``; the task divides the total by the optimizer step's token
count, so a term's contribution must be a sum over the same positions to compose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Reduction = Literal["mean", "sum"]
# What a distillation teacher of a module is (``teacher_kind``): a model with a head per input
# (``Backbone.load_classifier``), per token (``load_classifier(per_token=True)``), or a causal LM.
TeacherKind = Literal["classifier", "token_classifier", "causal_lm"]
LOSS_MODULES = "loss_modules"


@dataclass
class StepOutputs:
    """What a training step computed, as loss terms see it.

    Args:
        logits: class logits ``(B, C)``, or token logits ``(B, L, V)`` over the batch's full sequences
            (position ``t`` predicts token ``t + 1``).
        batch: the batch as the module received it (finetune's data: a dict of model inputs, ``labels``,
            ``index`` ...).
        task_loss: the task's own loss, reduced as ``reduction`` says.
        reduction: ``mean`` over samples, or ``sum`` over the positions ``mask`` marks.
        mask: token tasks: ``(B, L)`` bool, the positions of ``logits`` whose prediction is a target;
            None for per-sample tasks.
        features: the student features the terms asked for, by name.
    """

    logits: torch.Tensor
    batch: Any
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


class LossTermsMixin:
    """Loss terms for any ``LightningModule``: list it *before* ``LightningModule`` among the bases and return
    ``self.total_loss(logits=..., batch=..., task_loss=...)`` from ``training_step``. That is the whole contract
    ``finetune.distill.Distillation`` needs (the terms are described in the module docstring)::

        class Net(finetune.LossTermsMixin, pl.LightningModule):
            def training_step(self, batch, batch_idx):
                logits = self.net(batch["pixel_values"])
                loss = F.cross_entropy(logits, batch["labels"])
                return self.total_loss(logits=logits, batch=batch, task_loss=loss)

    Distillation also reads these, whose defaults fit a softmax classifier: ``teacher_kind`` (how the teacher
    is loaded), ``distillation_loss`` (per item, between student and teacher logits) and ``teacher_inputs``
    (the teacher's model inputs out of a batch); and ``labels`` when the module has it (class names in index
    order, checked against the teacher's).
    """

    # The model a distillation teacher must be (``finetune.distill``); None: the module takes no teacher.
    teacher_kind: ClassVar[TeacherKind | None] = "classifier"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_terms: dict[str, LossTerm] = {}
        # Modules that loss terms train (feature projections): in the optimizer, never in an export.
        self.loss_modules = nn.ModuleDict()

    def add_loss_term(self, term: LossTerm, module: nn.Module | None = None) -> None:
        """Add ``term`` to the training loss; ``module`` (if any) trains with the model. Call before
        ``configure_optimizers`` (a callback's ``setup``); a name already registered raises."""
        if term.name in self.loss_terms:
            raise KeyError(f"loss term {term.name!r} is already registered")
        self.loss_terms[term.name] = term
        if module is not None:
            self.loss_modules[term.name] = module

    def remove_loss_term(self, name: str) -> None:
        """Remove the term ``name`` and its module (no error when absent)."""
        self.loss_terms.pop(name, None)
        if name in self.loss_modules:
            del self.loss_modules[name]

    def requested_features(self) -> tuple[str, ...]:
        """The student features the registered terms need, each once, in registration order."""
        return tuple(dict.fromkeys(name for term in self.loss_terms.values() for name in term.features))

    def total_loss(
        self,
        outputs: StepOutputs | None = None,
        batch_size: int | None = None,
        per: torch.Tensor | None = None,
        *,
        logits: torch.Tensor | None = None,
        batch: Any = None,
        task_loss: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The training loss: the task loss re-weighted and the terms' contributions added.

        Give the step's ``StepOutputs`` (finetune's tasks), or its parts as keywords (your module):
        ``logits`` (``(B, C)``), the ``batch`` as ``training_step`` received it and the ``task_loss``, a
        mean over the batch (``mask``: positions of per-position logits that count). ``batch_size``
        (default: the logits' first dimension) weighs the logged values, which are divided by ``per``
        (token tasks: the micro-batch's target-token count). Logs ``train/loss`` and, with terms
        registered, ``train/task_loss`` and ``train/<name>_loss``.
        """
        if outputs is None:
            if logits is None or task_loss is None:
                raise TypeError("total_loss takes StepOutputs, or logits= and task_loss= (and batch=)")
            batch = {} if batch is None else batch
            outputs = StepOutputs(logits, batch, task_loss, mask=mask, features=dict(features or {}))
        batch_size = len(outputs.logits) if batch_size is None else batch_size
        weight, added, parts = 1.0, [], {}
        for name, term in self.loss_terms.items():
            contribution = term(outputs)
            weight *= contribution.task_weight
            added.append(contribution.loss)
            parts[f"train/{name}_loss"] = contribution.loss.detach()
        total = weight * outputs.task_loss + sum(added) if added else outputs.task_loss
        scale = 1.0 if per is None else 1.0 / per.clamp(min=1)
        if parts:
            parts["train/task_loss"] = outputs.task_loss.detach()
            self.log_dict({k: v * scale for k, v in parts.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach() * scale, prog_bar=True, batch_size=batch_size)
        return total

    def distillation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """The distillation loss per sample (or per position) between the student's and the teacher's logits
        of one batch: ``T² · KL`` of their softmaxes by default (``kd_per_item``); modules whose outputs are
        not one softmax (independent labels, scores) override it."""
        return kd_per_item(student, teacher, temperature)

    def teacher_inputs(self, batch: Any) -> Any:
        """The teacher's model inputs out of a training batch: the batch itself by default, for batches that
        are dicts of model inputs (``pixel_values``; ``input_ids``, ``attention_mask`` ...; other keys such
        as ``labels`` are dropped). Override it for other batches, e.g. ``{"pixel_values": batch[0]}``."""
        return batch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Not @override: the mixin's base is object; LightningModule's hook follows it in the MRO.
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = self.without_stray_loss_modules(checkpoint["state_dict"])
        super().on_load_checkpoint(checkpoint)

    def without_stray_loss_modules(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` less the weights of loss-term modules this module has not registered (a
        distillation run's feature projection, read back without distillation): they belong to training,
        not to the model."""
        own = set(self.state_dict())
        prefix = LOSS_MODULES + "."
        return {k: v for k, v in state_dict.items() if k in own or not k.startswith(prefix)}
