"""The strategy contract: decide which parameters train. Nothing else (optimiser code builds groups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from finetune.backbones.layout import Layout
from finetune.registry import Registry

BatchNormPolicy = Literal["eval", "train"]
# torch's public BatchNorm classes (their common base, ``_BatchNorm``, is private); timm's norm-act layers
# derive from these.
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class Strategy:
    """Base class: ``apply(model, layout)`` sets ``requires_grad`` on every parameter of ``model``.

    A strategy that changes how the backbone is read (quantisation) returns loader keyword arguments from
    ``load_options``. One whose frozen weights are the pretrained ones unchanged sets
    ``trainable_only_checkpoints`` so checkpoints keep only what trains.

    Args:
        batchnorm: what frozen BatchNorm layers do in training. ``eval`` (default) keeps them in eval
            mode so their running statistics stay those of pretraining; ``train`` lets them keep
            tracking statistics of the new data (their weights still do not train).
    """

    batchnorm: BatchNormPolicy = "eval"

    trainable_only_checkpoints: ClassVar[bool] = False

    def apply(self, model: nn.Module, layout: Layout) -> None:
        raise NotImplementedError

    def load_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the backbone loader (e.g. a quantisation config); none by default."""
        return {}

    def set_batchnorm_mode(self, model: nn.Module) -> None:
        """Put frozen BatchNorm layers in eval mode under the ``eval`` policy; call after ``model.train()``."""
        if self.batchnorm != "eval":
            return
        for module in model.modules():
            if isinstance(module, BATCHNORMS) and not any(p.requires_grad for p in module.parameters()):
                module.eval()


@dataclass
class AdapterStrategy(Strategy):
    """A strategy that adds adapters (peft) and trains them: ``inject`` is the one step that adds them, so
    an unquantised twin of a model can be given the same adapters again (merged exports of QLoRA runs).

    The frozen base stays the pretrained one, so checkpoints keep only what trains.
    """

    trainable_only_checkpoints: ClassVar[bool] = True

    def apply(self, model: nn.Module, layout: Layout) -> None:
        self.inject(model, layout)

    def inject(self, model: nn.Module, layout: Layout) -> list[str]:
        """Freeze ``model``, add the adapters and unfreeze what trains beside them; return the adapted
        module names."""
        raise NotImplementedError


STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "model.strategy")


def set_trainable(model: nn.Module, trainable: bool) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(trainable)


def unfreeze_modules(model: nn.Module, names: tuple[str, ...] | list[str]) -> None:
    """Make every parameter under the named submodules trainable."""
    for name in names:
        set_trainable(model.get_submodule(name), True)
