"""The backbone spec given in recipes and the loader contract every model family implements."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from finetune.errors import RecipeError
from finetune.paths import is_local_path, resolve_path
from finetune.registry import Registry

if TYPE_CHECKING:
    from finetune.backbones.heads import Head

KEY = "model.backbone"


@dataclass
class Classifier:
    """A loaded model with a fresh head for the task's labels; ``head`` lists the head's module names."""

    model: Any  # torch.nn.Module; typed loosely so importing this file does not import torch
    head: tuple[str, ...]


class BackboneLoader(Protocol):
    """What a model family must provide. ``source`` is the name without its prefix, or a local path."""

    family: str

    def claims(self, path: Path) -> bool:
        """True when a local folder holds a model of this family."""

    def load_classifier(
        self,
        source: str,
        backbone: Backbone,
        labels: list[str],
        options: Mapping[str, Any],
        per_token: bool = False,
        head: Head | None = None,
    ) -> Classifier:
        """Load with a new head for ``labels``; ``options`` come from the strategy (``Strategy.load_options``).
        ``per_token``: a head that classifies every token (token classification) instead of the whole input;
        ``RecipeError`` if the family has none. ``head``: the recipe's pooling and head layers
        (``finetune.backbones.heads``); None: the family's default head."""

    def load_causal_lm(self, source: str, backbone: Backbone, options: Mapping[str, Any]) -> Any:
        """Load a decoder-only language model with its LM head; raise ``RecipeError`` if the family has none."""

    def load_seq2seq_lm(self, source: str, backbone: Backbone, options: Mapping[str, Any]) -> Any:
        """Load an encoder-decoder language model (T5, BART) with its LM head; ``RecipeError`` if the model
        is none. Optional: a family without this method has no encoder-decoder models."""

    def logits(self, model: Any, batch: Mapping[str, Any]) -> Any:
        """Class logits for a batch produced by this family's preprocessing."""

    def features(
        self, model: Any, batch: Mapping[str, Any], names: tuple[str, ...]
    ) -> tuple[Any, dict[str, Any]]:
        """Class logits and the named features of one forward pass (``FEATURES`` says which names exist)."""

    def feature_width(self, model: Any, name: str) -> int:
        """The last dimension of feature ``name`` of ``model``."""

    def image_config(self, source: str, backbone: Backbone) -> ImageConfig:
        """How the pretrained weights expect images (image models); transforms are built from it
        (``finetune.data.transforms``)."""

    def tokenizer(self, source: str, backbone: Backbone) -> Any: ...

    def export(
        self, model: Any, path: Path, labels: list[str], backbone: Backbone, image: ImageConfig | None = None
    ) -> None:
        """Save ``model`` in the family's native format, loadable without ``finetune``; ``image`` (image
        models) is the evaluation preprocessing the export records, so that it preprocesses as validation did."""


FEATURES = """Feature names: ``pooled``, the features the classifier head reads (timm: ``forward_head(...,
pre_logits=True)``; Hugging Face: the last hidden state averaged over the attention mask), ``(B, D)``;
``hidden.N`` (Hugging Face only), the output of layer ``N`` (0: embeddings; negative counts from the top),
``(B, L, D)``."""


@dataclass(frozen=True)
class PixelStatistics:
    """How an image model's inputs are normalised: ``(pixels - mean) / std`` at ``size`` (height, width)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: tuple[int, int]


@dataclass(frozen=True)
class ImageConfig:
    """How images are prepared for a model at evaluation, in the terms of timm's data config.

    Resize so that a ``crop_pct`` share of the image's side gives ``size`` (``crop_mode``: ``center`` keeps
    the aspect ratio and resizes the shorter side, ``squash`` resizes each side, ``border`` pads), crop the
    centre to ``size`` (height, width), then normalise: ``(pixels / 255 - mean) / std``.

    Args:
        size: the model's input (height, width).
        mean: per-channel mean.
        std: per-channel standard deviation.
        interpolation: the resize filter (``bilinear``, ``bicubic``, ``nearest``, ``lanczos``, ``box``, ``hamming``).
        crop_pct: the share of the resized image the centre crop keeps (1: none).
        crop_mode: ``center``, ``squash`` or ``border``.
        fixed_size: the model takes no other input size (a position embedding of fixed length).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    fixed_size: bool = False

    @classmethod
    def of(cls, value: ImageConfig | Mapping[str, Any]) -> ImageConfig:
        """Accept an ``ImageConfig`` or its ``plain()`` form (checkpoint hyperparameters)."""
        if isinstance(value, ImageConfig):
            return value
        plain = dict(value)
        for key in ("size", "mean", "std"):
            plain[key] = tuple(plain[key])
        return cls(**plain)

    def plain(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings): for checkpoint hyperparameters and YAML."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}

    def timm_args(self) -> dict[str, Any]:
        """The fields of a timm data config (``timm.data.create_transform`` keywords, ``pretrained_cfg`` keys)."""
        return {
            "input_size": (3, *self.size),
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
        }

    def pixel_statistics(self) -> PixelStatistics:
        return PixelStatistics(self.mean, self.std, self.size)


def check_feature(name: str, family: str, key: str = "features") -> None:
    """RecipeError (at ``key``) unless ``name`` is a feature models of ``family`` provide."""
    prefix, _, layer = name.partition(".")
    valid = name == "pooled" or (family == "hf" and prefix == "hidden" and layer.lstrip("-").isdigit())
    if not valid:
        known = "pooled" if family == "timm" else "pooled, hidden.N (N a layer index, negative from the top)"
        raise RecipeError(key, f"{family} models have no feature {name!r}; choose one of: {known}")


LOADERS: Registry[BackboneLoader] = Registry("backbone family", KEY)


@dataclass
class Backbone:
    """Where the pretrained model comes from.

    Args:
        name: ``timm:NAME`` (any ``timm.create_model`` name), ``hf:ID_OR_DIR`` (any Hugging Face id or
            local folder), or a local folder, ``pkg://package/dir`` included, whose config.json says
            which family it is.
        pretrained: load pretrained weights; false builds the same architecture with random init.
        checkpoint: timm only: a local weights file (``.safetensors`` or ``.pth``) to load instead of the hub's.
        revision: Hugging Face hub revision (branch, tag or commit).
        trust_remote_code: let Hugging Face run code shipped with the model. Off unless you trust it.
    """

    name: str
    pretrained: bool = True
    checkpoint: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def of(cls, value: str | Backbone | Mapping[str, Any]) -> Backbone:
        """Accept the shorthand string form, a mapping, or a ``Backbone``."""
        if isinstance(value, Backbone):
            return value
        if isinstance(value, str):
            return cls(name=value)
        return cls(**value)

    def resolve(self) -> tuple[BackboneLoader, str]:
        """The loader for this backbone and the source it should read."""
        prefix, sep, rest = self.name.partition(":")
        if sep and prefix in LOADERS:
            return LOADERS.get(prefix), rest
        if is_local_path(self.name):
            path = resolve_path(self.name, KEY)
            for family in LOADERS:
                loader = LOADERS.get(family)
                if loader.claims(path):
                    return loader, str(path)
            raise RecipeError(
                KEY, f"{self.name} is not a timm or Hugging Face model folder (no usable config.json)"
            )
        families = ", ".join(f"{f}:NAME" for f in LOADERS)
        raise RecipeError(KEY, f"{self.name!r} has no known prefix; write {families} or give a local folder")

    @property
    def family(self) -> str:
        return self.resolve()[0].family

    def load_classifier(
        self,
        labels: list[str],
        options: Mapping[str, Any] | None = None,
        per_token: bool = False,
        head: Head | None = None,
    ) -> Classifier:
        """The model with a new head for ``labels``, per input or, with ``per_token``, per token; ``head``
        chooses the pooling and head layers (default: the family's own)."""
        loader, source = self.resolve()
        return loader.load_classifier(source, self, labels, options or {}, per_token=per_token, head=head)

    def load_causal_lm(self, options: Mapping[str, Any] | None = None) -> Any:
        loader, source = self.resolve()
        return loader.load_causal_lm(source, self, options or {})

    def load_seq2seq_lm(self, options: Mapping[str, Any] | None = None) -> Any:
        """An encoder-decoder language model (T5, BART) with its pretrained LM head, read with the strategy's
        loader ``options`` (quantisation, dtype)."""
        loader, source = self.resolve()
        load = getattr(loader, "load_seq2seq_lm", None)
        if load is None:
            raise RecipeError(
                KEY, f"{loader.family} models are not encoder-decoder language models; give an hf: T5 or BART"
            )
        return load(source, self, options or {})

    def tokenizer(self) -> Any:
        loader, source = self.resolve()
        return loader.tokenizer(source, self)

    def image_config(self) -> ImageConfig:
        """How the pretrained weights expect images (image models only)."""
        loader, source = self.resolve()
        return loader.image_config(source, self)

    def pixel_statistics(self) -> PixelStatistics:
        """The normalisation and input size the pretrained weights expect (image models only)."""
        return self.image_config().pixel_statistics()

    def image_transform(self, train: bool) -> Callable[[Any], Any]:
        """PIL image -> float tensor ``(C, H, W)`` under the default image preparation (see
        ``finetune.data.transforms``; data modules build theirs from their recipe keys)."""
        from finetune.data.transforms import ImagePreparation

        return ImagePreparation().transform(self.image_config(), train)
