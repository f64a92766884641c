"""``full`` (everything trains) and ``freeze`` (linear probe: only the new head trains)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finetune.backbones.layout import Layout
from finetune.strategies.base import STRATEGIES, Strategy, set_trainable, unfreeze_modules


@STRATEGIES.register("full")
@dataclass
class Full(Strategy):
    """Train every parameter."""

    def apply(self, model: nn.Module, layout: Layout) -> None:
        set_trainable(model, True)


@STRATEGIES.register("freeze")
@dataclass
class Freeze(Strategy):
    """Linear probe: freeze the backbone, train only the new head."""

    def apply(self, model: nn.Module, layout: Layout) -> None:
        set_trainable(model, False)
        unfreeze_modules(model, layout.head)
