"""What every finetune task shares: a backbone, a strategy that decides what trains, and the optimizer."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from finetune.backbones import Backbone
from finetune.backbones.layout import Layout
from finetune.strategies import Strategy, describe_strategy, resolve_strategy


class FinetuneTask(pl.LightningModule):
    """Base LightningModule: subclasses build ``self.model`` (and ``self.layout``) in ``build_model``.

    ``configure_model`` calls ``build_model`` once, then applies the strategy. Only trainable parameters
    reach the optimizer. Frozen BatchNorm layers follow the strategy's ``batchnorm`` policy in training.
    Subclasses declare the metric checkpoints follow in ``monitor`` / ``monitor_mode``.
    """

    monitor = "val/loss"
    monitor_mode = "min"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "full",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.backbone = Backbone.of(backbone)
        self.loader, _ = self.backbone.resolve()
        self.strategy = resolve_strategy(strategy)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.model: nn.Module | None = None
        self.layout: Layout | None = None

    def base_hparams(self) -> dict[str, Any]:
        """Plain-data hyperparameters, so checkpoints load with ``weights_only=True`` and rebuild the task."""
        return {"backbone": asdict(self.backbone), "strategy": describe_strategy(self.strategy)}

    def build_model(self) -> tuple[nn.Module, Layout]:
        """Load the backbone with its task head; return the model and its layout."""
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, self.layout = self.build_model()
        self.strategy.apply(self.model, self.layout)
        # Hugging Face loads models in eval mode and Lightning (2.2+) keeps module modes as they are, so
        # without this, dropout would stay off for the whole of training.
        self.train(self.training)

    def export(self, directory: Path) -> Path:
        """Write the model so that it loads without ``finetune``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> FinetuneTask:
        super().train(mode)
        if mode and self.model is not None:
            self.strategy.set_batchnorm_mode(self.model)  # Lightning calls train() each epoch
        return self

    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(parameters, lr=1e-4)
        else:
            optimizer = self.optimizer_factory(parameters)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": self.monitor}}
