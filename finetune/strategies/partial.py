"""``partial``: train the head, the last N blocks (and what sits above them), and modules named by pattern."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from finetune.backbones.layout import Layout
from finetune.errors import RecipeError
from finetune.strategies.base import STRATEGIES, Strategy, set_trainable, unfreeze_modules


@STRATEGIES.register("partial")
@dataclass
class Partial(Strategy):
    """Freeze the backbone, then unfreeze the top of it.

    Args:
        last_blocks: how many of the top blocks train. Modules above the last block (a final norm, a
            pooler) train with them. 0 trains only the head and the ``modules`` matches.
        modules: regular expressions matched (``re.fullmatch``) against module names; every match trains.
    """

    last_blocks: int = 1
    modules: list[str] = field(default_factory=list)

    def apply(self, model: nn.Module, layout: Layout) -> None:
        if not 0 <= self.last_blocks <= len(layout.blocks):
            raise RecipeError(
                "model.strategy.last_blocks",
                f"{self.last_blocks} is not between 0 and the model's {len(layout.blocks)} blocks",
            )
        set_trainable(model, False)
        unfreeze_modules(model, layout.head)
        if self.last_blocks:
            self._unfreeze_top(model, layout)
        unfreeze_modules(model, self._matches(model))

    def _unfreeze_top(self, model: nn.Module, layout: Layout) -> None:
        """Unfreeze the last blocks and every parameter registered after the last block (norms, poolers)."""
        first = len(layout.blocks) - self.last_blocks
        named = list(model.named_parameters())
        blocks = [layout.block_index(name) for name, _ in named]
        last_position = max(i for i, block in enumerate(blocks) if block == len(layout.blocks) - 1)
        for position, ((_, parameter), block) in enumerate(zip(named, blocks)):
            if (block is not None and block >= first) or (block is None and position > last_position):
                parameter.requires_grad_(True)

    def _matches(self, model: nn.Module) -> list[str]:
        names = [name for name, _ in model.named_modules() if name]
        matched = []
        for pattern in self.modules:
            try:
                regex = re.compile(pattern)
            except re.error as error:
                raise RecipeError(
                    "model.strategy.modules", f"{pattern!r} is not a valid regular expression ({error})"
                ) from None
            found = [name for name in names if regex.fullmatch(name)]
            if not found:
                raise RecipeError(
                    "model.strategy.modules", f"pattern {pattern!r} matches no module of the model"
                )
            matched.extend(found)
        return matched
