"""Classification heads chosen by the recipe: how an encoder's token states become one vector, and what
maps that vector to the classes.

Hugging Face ``AutoModelForSequenceClassification`` classifies from a fixed place (BERT: the [CLS] token
through its pretrained pooler), which is not what every encoder was trained for: sentence-transformers
models were trained so that the *mean* of their token states carries the meaning. ``Head`` lets the recipe
say; ``PooledClassifier`` is the model it builds (the base encoder, ``AutoModel``, plus ``pool`` and a small
MLP). A sentence-transformers folder (``modules.json`` with a Pooling module) defaults to the pooling it was
trained with (``sentence_transformers_pooling``).

An export of a ``PooledClassifier`` is the encoder's own folder (loadable with ``AutoModel``) plus
``head.safetensors`` and ``head.json`` (pooling, layer sizes, labels): ``predict_with_head`` in the README
shows the dozen lines that use it without ``finetune``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from finetune.errors import require

Pooling = Literal["cls", "pooler", "mean", "max", "last"]
POOLINGS: tuple[str, ...] = ("cls", "pooler", "mean", "max", "last")
HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
KEY = "model.head"

# sentence-transformers' Pooling config flags -> our pooling names (the modes we can reproduce exactly).
_ST_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}


@dataclass(frozen=True)
class Head:
    """The classification head: pooling, dropout and an optional hidden layer.

    Args:
        pooling: Hugging Face encoders: ``cls`` (the first token's state), ``pooler`` (the model's pretrained
            pooler, BERT's [CLS] dense + tanh), ``mean`` / ``max`` (over the non-padding tokens), ``last``
            (the last non-padding token: decoders used as classifiers). timm models: timm's ``global_pool``
            (``avg``, ``max``, ``avgmax``, ``catavgmax``, ``token`` ...). Default: the model's own head, or a
            sentence-transformers folder's pooling.
        dropout: dropout before each linear layer of the head (Hugging Face); timm's ``drop_rate``.
        hidden: width of a hidden layer (linear + GELU) before the output layer; none by default.
    """

    pooling: str | None = None
    dropout: float = 0.0
    hidden: int | None = None

    def __post_init__(self) -> None:
        require(0 <= self.dropout < 1, f"{KEY}.dropout", f"must be in [0, 1), got {self.dropout}")
        require(
            self.hidden is None or self.hidden > 0, f"{KEY}.hidden", f"must be 1 or more, got {self.hidden}"
        )

    @classmethod
    def of(cls, value: Head | dict[str, Any] | None) -> Head | None:
        """Accept a ``Head``, its ``plain()`` form (checkpoint hyperparameters) or None."""
        return value if value is None or isinstance(value, Head) else cls(**value)

    def plain(self) -> dict[str, Any]:
        return asdict(self)

    def check_pooling(self, family: str, choices: tuple[str, ...] = POOLINGS) -> None:
        require(
            self.pooling is None or self.pooling in choices,
            f"{KEY}.pooling",
            f"{family} models pool with one of {', '.join(choices)}, not {self.pooling!r}",
        )


def pool(
    states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    mode: str,
    pooler_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """One vector per sequence from token ``states`` ``(B, L, D)``; padding (``attention_mask`` 0) is never
    pooled. ``last`` finds the last non-padding position, so left and right padding both work."""
    if mode == "pooler":
        require(
            pooler_output is not None,
            f"{KEY}.pooling",
            "this model has no pretrained pooler; choose cls, mean, max or last",
        )
        return pooler_output
    if mode == "cls":
        return states[:, 0]
    mask = (
        torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        if attention_mask is None
        else attention_mask.bool()
    )
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1)
    if mode == "max":
        return states.masked_fill(~mask.unsqueeze(-1), torch.finfo(states.dtype).min).amax(1)
    positions = torch.arange(states.shape[1], device=states.device).expand_as(mask)
    last = positions.masked_fill(~mask, -1).amax(1).clamp(min=0)
    return states[torch.arange(len(states), device=states.device), last]


def head_layers(width: int, num_labels: int, head: Head) -> nn.Sequential:
    """Dropout, an optional hidden layer (linear + GELU, dropout), then the output layer."""
    layers: list[nn.Module] = [nn.Dropout(head.dropout)]
    if head.hidden is not None:
        layers += [nn.Linear(width, head.hidden), nn.GELU(), nn.Dropout(head.dropout)]
        width = head.hidden
    layers.append(nn.Linear(width, num_labels))
    return nn.Sequential(*layers)


class PooledClassifier(nn.Module):
    """A Hugging Face base model (``encoder``, from ``AutoModel``) with a recipe-chosen head (``head``).

    ``forward(**inputs)`` returns a ``SequenceClassifierOutput`` (``logits``; ``hidden_states`` when asked),
    like the ``*ForSequenceClassification`` models it stands in for; ``config`` is the encoder's.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, head: Head, pooling: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.spec = head
        self.head = head_layers(encoder.config.hidden_size, num_labels, head)

    @property
    def config(self) -> Any:
        return self.encoder.config

    def forward(self, output_hidden_states: bool = False, **inputs: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        output = self.encoder(**inputs, output_hidden_states=output_hidden_states)
        pooled = pool(
            output.last_hidden_state,
            inputs.get("attention_mask"),
            self.pooling,
            getattr(output, "pooler_output", None),
        )
        return SequenceClassifierOutput(logits=self.head(pooled), hidden_states=output.hidden_states)

    def save_head(self, directory: Path, labels: list[str]) -> None:
        """Write ``head.safetensors`` (the head's weights, names as in ``head_layers``) and ``head.json``."""
        from safetensors.torch import save_file

        state = {name: t.detach().cpu().contiguous() for name, t in self.head.state_dict().items()}
        save_file(state, str(directory / HEAD_WEIGHTS), metadata={"format": "pt"})
        config = {"pooling": self.pooling, "hidden": self.spec.hidden, "activation": "gelu", "labels": labels}
        (directory / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def saved_head(folder: Path) -> dict[str, Any] | None:
    """The ``head.json`` of an exported ``PooledClassifier`` folder, or None."""
    path = folder / HEAD_CONFIG
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_head_weights(model: PooledClassifier, folder: Path) -> None:
    """Load ``head.safetensors`` from an exported folder into ``model.head``."""
    from safetensors.torch import load_file

    model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))


def sentence_transformers_pooling(modules: dict[str, Any] | list[Any], read: Any) -> str | None:
    """The pooling a sentence-transformers model was trained with, from its ``modules.json`` (``modules``)
    and ``read(relative_path) -> dict`` for its Pooling module's config; None when it has no Pooling
    module or pools in a way we cannot reproduce exactly."""
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            config = read(f"{module['path']}/config.json")
            modes = [mode for flag, mode in _ST_MODES.items() if config.get(flag)]
            return modes[0] if len(modes) == 1 else None
    return None
