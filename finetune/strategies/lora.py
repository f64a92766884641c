"""``lora``: freeze the backbone, add low-rank adapters (or another peft adapter type), train them and the head.

Adapters are added with peft's ``inject_adapter_in_model`` rather than ``get_peft_model``: the model stays
the same object with the same module names (an adapted layer gains ``lora_A``/``lora_B`` children and its
weight moves to ``<layer>.base_layer.weight``), so the layout's block names still match, per-layer
learning rates can group adapter parameters by block, and timm and Hugging Face models take one path.
``finetune.strategies.adapters.adapter_parameter_names`` says which parameters are the adapters'.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from typing_extensions import override

from finetune.backbones.layout import Layout, within
from finetune.errors import RecipeError, first_line
from finetune.registry import Registry
from finetune.strategies.adapters import adapter_summary
from finetune.strategies.base import STRATEGIES, AdapterStrategy, set_trainable, unfreeze_modules

log = logging.getLogger(__name__)

TARGETS_KEY = "model.strategy.target_modules"
ALL_LINEAR = "all-linear"

# Adapter type name -> builds its peft config from the strategy and the resolved target module names.
ADAPTERS: Registry[Callable[[LoRA, list[str]], Any]] = Registry("adapter type", "model.strategy.adapter")


@ADAPTERS.register("lora")
def _lora_config(strategy: LoRA, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=strategy.rank,
        lora_alpha=strategy.alpha,
        lora_dropout=strategy.dropout,
        use_dora=strategy.use_dora,
        target_modules=targets,
        **strategy.options,
    )


@ADAPTERS.register("ia3")
def _ia3_config(strategy: LoRA, targets: list[str]) -> Any:
    from peft import IA3Config

    # IA3 has no rank; options may name `feedforward_modules` (scaled on their input, not output).
    return IA3Config(target_modules=targets, **strategy.options)


def _low_rank_config(class_name: str) -> Callable[[LoRA, list[str]], Any]:
    """LoHa and LoKr: the same arguments, a different peft config class."""

    def build(strategy: LoRA, targets: list[str]) -> Any:
        import peft

        return getattr(peft, class_name)(
            r=strategy.rank,
            alpha=strategy.alpha,
            rank_dropout=strategy.dropout,
            target_modules=targets,
            **strategy.options,
        )

    return build


ADAPTERS.register("loha")(_low_rank_config("LoHaConfig"))
ADAPTERS.register("lokr")(_low_rank_config("LoKrConfig"))


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a linear layer with a transposed weight; peft adapts it.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_plain_conv(module: nn.Module) -> bool:
    # Depthwise/grouped convolutions (ConvNeXt) are left out: peft's conv adapters assume groups == 1.
    return isinstance(module, nn.Conv2d) and module.groups == 1


@STRATEGIES.register("lora")
@dataclass
class LoRA(AdapterStrategy):
    """Freeze the backbone; train adapters on ``target_modules`` plus ``modules_to_save`` (default: a new head).

    Args:
        rank: adapter rank ``r`` (LoRA, LoHa, LoKr).
        alpha: scaling numerator; updates are scaled by ``alpha / rank``.
        dropout: dropout on the adapter input (LoRA) or on its rank (LoHa, LoKr).
        target_modules: module names to adapt: exact names, name suffixes (``qkv``, ``q_proj``) or
            regular expressions over the full name, and ``all-linear`` (every linear layer outside the
            head). Default ``all-linear``; a model without linear layers (a ResNet) gets its convolutions.
        modules_to_save: modules trained in full beside the adapters, named the same way. Default: the
            task's new head (a causal LM's pretrained ``lm_head`` is not included).
        use_dora: weight-decomposed LoRA (DoRA).
        adapter: the peft adapter type: ``lora``, ``ia3``, ``loha`` or ``lokr``.
        options: further keyword arguments for that type's peft config (e.g. ``init_lora_weights``,
            ``feedforward_modules`` for ``ia3``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    adapter: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RecipeError("model.strategy.rank", f"must be 1 or more, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise RecipeError("model.strategy.dropout", f"must be in [0, 1), got {self.dropout}")
        ADAPTERS.get(self.adapter)  # unknown names fail here, listing the known ones
        if self.use_dora and self.adapter != "lora":
            raise RecipeError(
                "model.strategy.use_dora", f"DoRA is a LoRA variant; drop it for {self.adapter}"
            )

    @override
    def inject(self, model: nn.Module, layout: Layout) -> list[str]:
        """Freeze ``model``, add the adapters, unfreeze ``modules_to_save``; return the adapted module names."""
        from peft import inject_adapter_in_model

        set_trainable(model, False)
        trained = self._trained_modules(model, layout)
        targets = self._targets(model, layout, excluded=trained)
        try:
            inject_adapter_in_model(ADAPTERS.get(self.adapter)(self, targets), model)
        except (ValueError, TypeError) as error:
            raise RecipeError(
                TARGETS_KEY, f"peft cannot adapt these modules ({first_line(error)})"
            ) from error
        unfreeze_modules(model, trained)
        log.debug("%s adapters on %d modules: %s", self.adapter, len(targets), adapter_summary(targets))
        return targets

    def _trained_modules(self, model: nn.Module, layout: Layout) -> list[str]:
        if self.modules_to_save is None:
            return list(layout.head) if layout.new_head else []
        names = [name for name, _ in model.named_modules() if name]
        return _matching(self.modules_to_save, names, "model.strategy.modules_to_save")

    def _targets(self, model: nn.Module, layout: Layout, excluded: list[str]) -> list[str]:
        """Leaf modules to adapt, outside the head and the fully trained modules."""
        skip = (*layout.head, *excluded)
        modules = {
            name: module
            for name, module in model.named_modules()
            if name and not any(within(name, s) for s in skip)
        }
        linear = [name for name, module in modules.items() if _is_linear(module)]
        patterns = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if patterns is None:
            found = linear or [name for name, module in modules.items() if _is_plain_conv(module)]
            if not found:
                raise RecipeError(
                    TARGETS_KEY, "the model has no linear or convolution layers; name the modules"
                )
            return found
        named = [p for p in patterns if p != ALL_LINEAR]
        chosen = set(_matching(named, list(modules), TARGETS_KEY))
        if ALL_LINEAR in patterns:
            if not linear:
                raise RecipeError(TARGETS_KEY, "all-linear matches no module: the model has no linear layers")
            chosen.update(linear)
        return [name for name in modules if name in chosen]


def _matching(patterns: list[str], names: list[str], key: str) -> list[str]:
    """Names equal to, ending in ``.<pattern>``, or fully matching each pattern; every pattern must match."""
    found: dict[str, None] = {}
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise RecipeError(key, f"{pattern!r} is not a valid regular expression ({error})") from None
        matched = [n for n in names if n == pattern or n.endswith("." + pattern) or regex.fullmatch(n)]
        if not matched:
            raise RecipeError(key, f"{pattern!r} matches no module of the model; check the module names")
        found.update(dict.fromkeys(matched))
    return list(found)
