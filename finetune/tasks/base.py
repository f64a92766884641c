"""What every finetune task shares: a backbone, a strategy that decides what trains, and the optimizer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.backbones.layout import Layout
from finetune.errors import RecipeError
from finetune.optim import OptimizerConfig, ScheduleConfig
from finetune.strategies import Strategy, describe_strategy, resolve_strategy
from finetune.tasks.loss_terms import LossTerm, StepOutputs, kd_per_item

LOSS_MODULES = "loss_modules"
# What a distillation teacher of a task is (``FinetuneTask.teacher_kind``): a model with a head per input
# (``Backbone.load_classifier``), per token (``load_classifier(per_token=True)``), or a causal LM.
TeacherKind = Literal["classifier", "token_classifier", "causal_lm"]


class Monitor(NamedTuple):
    """The metric that picks the best checkpoint (and that a ``plateau`` schedule watches), and which way is
    better."""

    metric: str
    mode: Literal["min", "max"]


class FinetuneTask(pl.LightningModule):
    """Base LightningModule: subclasses build ``self.model`` (and ``self.layout``) in ``build_model``.

    ``configure_model`` calls ``build_model`` once, then applies the strategy. Only trainable parameters
    reach the optimizer, in the groups ``optimizer`` describes (``finetune.optim.param_groups``); the LR
    follows ``lr_scheduler`` per optimizer step. Frozen BatchNorm layers follow the strategy's
    ``batchnorm`` policy in training.
    Subclasses declare the metric checkpoints follow in ``monitor``. Under a strategy
    with ``trainable_only_checkpoints`` (adapters), checkpoints hold only the trained weights and buffers,
    and loading one checks that every trained weight is there.

    The training loss goes through registered loss terms (``add_loss_term``; the contract is in
    ``finetune.tasks.loss_terms``): subclasses compute their step's ``StepOutputs`` and return
    ``self.total_loss(outputs, batch_size)``.

    Args:
        backbone: the pretrained model: ``timm:NAME``, ``hf:ID``, a local folder, or a full backbone spec.
        strategy: what trains: a registered name (default arguments) or a strategy object
            (``class_path``/``init_args`` in a recipe).
        optimizer: optimizer and parameter groups (``OptimizerConfig``; default AdamW, lr 1e-4); in a
            recipe, the top-level ``optimizer:`` section.
        lr_scheduler: the LR schedule per optimizer step (``ScheduleConfig``; default constant); in a
            recipe, the top-level ``lr_scheduler:`` section.
    """

    monitor: ClassVar[Monitor] = Monitor("val/loss", "min")
    # The epoch-level metrics the task logs: what a plateau schedule (or a callback) may monitor.
    epoch_metrics: ClassVar[tuple[str, ...]] = ("val/loss",)
    # The model a distillation teacher must be (``finetune.distill``); None: the task takes no teacher.
    teacher_kind: ClassVar[TeacherKind | None] = None

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "full",
        optimizer: OptimizerConfig | None = None,
        lr_scheduler: ScheduleConfig | None = None,
    ) -> None:
        super().__init__()
        self.backbone = Backbone.of(backbone)
        self.loader, _ = self.backbone.resolve()
        self.strategy = resolve_strategy(strategy)
        self.optimizer_config = _config(OptimizerConfig, optimizer)
        self.schedule_config = _config(ScheduleConfig, lr_scheduler)
        self.model: nn.Module | None = None
        self.layout: Layout | None = None
        self.loss_terms: dict[str, LossTerm] = {}
        # Modules that loss terms train (feature projections): in the optimizer, never in an export.
        self.loss_modules = nn.ModuleDict()
        # Trainable-only checkpoints lack the frozen base; `load_weights` checks what must be there.
        self.strict_loading = not self.strategy.trainable_only_checkpoints

    def base_hparams(self) -> dict[str, Any]:
        """Plain-data hyperparameters, so checkpoints load with ``weights_only=True`` and rebuild the task."""
        return {
            "backbone": asdict(self.backbone),
            "strategy": describe_strategy(self.strategy),
            "optimizer": asdict(self.optimizer_config),
            "lr_scheduler": asdict(self.schedule_config),
        }

    def build_model(self) -> tuple[nn.Module, Layout]:
        """Load the backbone with its task head (``load_backbone``); return the model and its layout."""
        raise NotImplementedError

    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        """The backbone with its task head, read with loader ``options`` (see ``Strategy.load_options``)."""
        raise NotImplementedError

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, self.layout = self.build_model()
        self.strategy.apply(self.model, self.layout)
        # Hugging Face loads models in eval mode and Lightning (2.2+) keeps module modes as they are, so
        # without this, dropout would stay off for the whole of training.
        self.train(self.training)

    def export(self, directory: Path, merge: bool = False) -> Path:
        """Write the model so that it loads without ``finetune``; adapters alone unless ``merge``."""
        raise NotImplementedError

    def describe_task(self) -> str:
        """What is trained, in a line or two, for the run plan: the task, its backbone and model class."""
        model = type(self.model).__name__ if self.model is not None else "not built"
        return f"{type(self).__name__} on {self.backbone.name} ({model})"

    def distillation_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float
    ) -> torch.Tensor:
        """The distillation loss per sample (or per position) between the student's and the teacher's logits
        of one batch: ``T² · KL`` of their softmaxes by default (``kd_per_item``); tasks whose outputs are
        not one softmax (independent labels, scores) override it."""
        return kd_per_item(student, teacher, temperature)

    # --- loss terms (finetune.tasks.loss_terms) ---------------------------------------------------------

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
        self, outputs: StepOutputs, batch_size: int, per: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The training loss: the task loss re-weighted and the terms' contributions added.

        Logs ``train/loss`` and, with terms registered, ``train/task_loss`` and ``train/<name>_loss``;
        logged values are divided by ``per`` (token tasks: the micro-batch's target-token count).
        """
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

    def checkpointed_names(self) -> set[str]:
        """State-dict keys a checkpoint keeps: all, or only trainable parameters and buffers."""
        names = set(self.state_dict())
        if not self.strategy.trainable_only_checkpoints:
            return names
        kept = {n for n, p in self.named_parameters() if p.requires_grad} | {
            n for n, _ in self.named_buffers()
        }
        return names & kept

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kept = self.checkpointed_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in kept}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:
            return  # a sharded checkpoint (fsdp2): the strategy has loaded the shards itself
        checkpoint["state_dict"] = self._without_stray_loss_modules(checkpoint["state_dict"])
        self._check_complete(checkpoint["state_dict"])

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's ``state_dict`` (complete, or trainable-only under an adapter strategy).

        Weights of loss-term modules this task has not registered (a distillation run's feature
        projection, when exporting it) are skipped: they belong to training, not to the model.
        """
        state_dict = self._without_stray_loss_modules(state_dict)
        self._check_complete(state_dict)
        self.load_state_dict(state_dict, strict=self.strict_loading)

    def _without_stray_loss_modules(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = set(self.state_dict())
        prefix = LOSS_MODULES + "."
        return {k: v for k, v in state_dict.items() if k in own or not k.startswith(prefix)}

    def _check_complete(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(self.checkpointed_names() - set(state_dict))
        if missing:
            raise RecipeError(
                "ckpt_path",
                f"the checkpoint lacks {len(missing)} trained weights (first: {missing[0]}); "
                "it was written for another model or strategy",
            )

    @override
    def train(self, mode: bool = True) -> FinetuneTask:
        super().train(mode)
        if mode and self.model is not None:
            self.strategy.set_batchnorm_mode(self.model)  # Lightning calls train() each epoch
        return self

    @override
    def configure_optimizers(self) -> Any:
        from finetune.optim.optimizers import build_optimizer
        from finetune.optim.param_groups import param_groups
        from finetune.optim.schedules import build_schedule, total_steps

        groups = param_groups(self.model, self.layout, self.optimizer_config) + self._loss_module_groups()
        optimizer = build_optimizer(groups, self.optimizer_config)
        steps = total_steps(self.trainer)
        self._check_monitor()
        schedules = build_schedule(
            optimizer, self.schedule_config, steps, self.monitor.metric, self.monitor.mode
        )
        return [optimizer], schedules

    def _check_monitor(self) -> None:
        """A plateau schedule watching a metric this task never logs would fail after the first epoch, once
        checkpoints exist; refuse it before training."""
        config = self.schedule_config
        watched = config.monitor or self.monitor.metric
        if config.name == "plateau" and watched not in self.epoch_metrics:
            raise RecipeError(
                "lr_scheduler.monitor",
                f"{type(self).__name__} logs no {watched!r}; choose one of: {', '.join(self.epoch_metrics)}",
            )

    def _loss_module_groups(self) -> list[dict[str, Any]]:
        """One group per loss-term module, at the head's level, with the optimizer's base LR and decay."""
        from finetune.optim.param_groups import HEAD

        top = len(self.layout.blocks) + 1 if self.layout is not None else 1
        groups = []
        for name, module in self.loss_modules.items():
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            if named:
                groups.append(
                    {
                        "params": [p for _, p in named],
                        "names": [f"{LOSS_MODULES}.{name}.{n}" for n, _ in named],
                        "lr": self.optimizer_config.lr,
                        "weight_decay": self.optimizer_config.weight_decay,
                        "name": f"{LOSS_MODULES}.{name}",
                        "level": top,
                        "block": HEAD,
                        "rule": None,
                    }
                )
        return groups


def _config(kind: type, value: Any) -> Any:
    """``kind`` from an instance, a mapping (checkpoint hyperparameters) or None (the defaults)."""
    if value is None:
        return kind()
    return value if isinstance(value, kind) else kind(**value)
