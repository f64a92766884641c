"""Fine-tuning strategies: registered objects that decide which parameters train.

Pick one in a recipe by name (``strategy: freeze``) or with arguments
(``strategy: {class_path: finetune.strategies.Partial, init_args: {last_blocks: 2}}``).
``lora``/``qlora`` add peft adapters; ``adapter_parameter_names(model)`` lists the adapters' parameters.
"""

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from finetune.strategies.adapters import adapter_parameter_names
from finetune.strategies.base import STRATEGIES, AdapterStrategy, Strategy
from finetune.strategies.lora import LoRA
from finetune.strategies.partial import Partial
from finetune.strategies.qlora import QLoRA
from finetune.strategies.simple import Freeze, Full

__all__ = [
    "STRATEGIES",
    "AdapterStrategy",
    "Freeze",
    "Full",
    "LoRA",
    "Partial",
    "QLoRA",
    "Strategy",
    "adapter_parameter_names",
    "describe_strategy",
    "resolve_strategy",
]


def resolve_strategy(value: str | Strategy | Mapping[str, Any]) -> Strategy:
    """A strategy from its registered name (default arguments), a ``{name, **arguments}`` mapping, or as given."""
    if isinstance(value, Strategy):
        return value
    if isinstance(value, str):
        return STRATEGIES.get(value)()
    arguments = dict(value)
    return STRATEGIES.get(arguments.pop("name"))(**arguments)


def describe_strategy(strategy: Strategy) -> dict[str, Any]:
    """The mapping ``resolve_strategy`` reads back: kept in checkpoints as plain data."""
    return {"name": STRATEGIES.name_of(type(strategy)), **asdict(strategy)}
