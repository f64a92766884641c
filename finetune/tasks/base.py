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
from finetune.tasks.loss_terms import LOSS_MODULES, LossTermsMixin, TeacherKind


class Monitor(NamedTuple):
    """The metric that picks the best checkpoint (and that a ``plateau`` schedule watches), and which way is
    better."""

    metric: str
    mode: Literal["min", "max"]


class FinetuneTask(LossTermsMixin, pl.LightningModule):
    """Base LightningModule: subclasses build ``self.model`` (and ``self.layout``) in ``build_model``.

    ``configure_model`` calls ``build_model`` once, then applies the strategy. Only trainable parameters
    reach the optimizer, in the groups ``optimizer`` describes (``finetune.optim.param_groups``); the LR
    follows ``lr_scheduler`` per optimizer step. Frozen BatchNorm layers follow the strategy's
    ``batchnorm`` policy in training.
    Subclasses declare the metric checkpoints follow in ``monitor``. Under a strategy
    with ``trainable_only_checkpoints`` (adapters), checkpoints hold only the trained weights and buffers,
    and loading one checks that every trained weight is there.

    The training loss goes through registered loss terms (``add_loss_term``, from ``LossTermsMixin``; the
    contract is in ``finetune.tasks.loss_terms``): subclasses compute their step's ``StepOutputs`` and return
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

    def datamodule(self) -> Any:
        """The trainer's datamodule, or None (a task built without data, from its hyperparameters)."""
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def describe_task(self) -> str:
        """What is trained, in a line or two, for the run plan: the task, its backbone and model class."""
        model = type(self.model).__name__ if self.model is not None else "not built"
        return f"{type(self).__name__} on {self.backbone.name} ({model})"

    def memory_rows(self) -> list[tuple[str, int]]:
        """Bytes the task holds beside the trained model on every device (a frozen reference model, for
        example), as rows of the run plan's memory table."""
        return []

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
        super().on_load_checkpoint(checkpoint)  # drops the weights of loss modules not registered
        if "state_dict" in checkpoint:  # absent from a sharded checkpoint: fsdp2 has loaded the shards itself
            self._check_complete(checkpoint["state_dict"])

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a checkpoint's ``state_dict`` (complete, or trainable-only under an adapter strategy).

        Weights of loss-term modules this task has not registered (a distillation run's feature
        projection, when exporting it) are skipped: they belong to training, not to the model.
        """
        state_dict = self.without_stray_loss_modules(state_dict)
        self._check_complete(state_dict)
        self.load_state_dict(state_dict, strict=self.strict_loading)

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
        from finetune.optim.groups import param_groups
        from finetune.optim.optimizers import build_optimizer
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
        from finetune.optim.groups import HEAD

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
