"""Image preparation: the recipe's image keys as one typed value, and what is built from it.

``ImagePreparation`` holds the keys of ``ImageClassificationData`` that decide how images reach the model
(size, augmentation, evaluation crop, MixUp/CutMix), validated when the recipe loads. With the backbone's
``ImageConfig`` (how its weights expect images) it builds:

- the evaluation transform: resize (+ centre crop per ``crop_pct``) and normalise, timm's
  ``create_transform(is_training=False)``; ``eval_config`` is that preprocessing as data, which the
  export records;
- the training transform: timm's ``create_transform(is_training=True)`` with the augmentation's settings
  (torchvision's ``TrivialAugmentWide`` for ``trivialaugment``), or the evaluation transform for ``none``;
- the batch mixer: timm's ``Mixup`` over training batches, which adds soft ``targets`` beside ``labels``.

The same code serves timm and Hugging Face models: both describe their preprocessing as an ``ImageConfig``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from finetune.backbones.base import ImageConfig
from finetune.batch import LABELS
from finetune.errors import RecipeError, require
from finetune.registry import Registry

# The batch key of MixUp/CutMix soft targets ``(B, C)``; ``labels`` keep the original classes (metrics).
TARGETS = "targets"
# The default augmentation: see ``ImagePreparation``.
DEFAULT_AUGMENT = "none"
# ``AugmentInfo.auto_augment`` value naming torchvision's TrivialAugmentWide (timm has no such policy).
TRIVIAL = "trivialaugment"

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]


@dataclass(frozen=True)
class AugmentInfo:
    """A named training augmentation.

    Args:
        name: the recipe's ``data.augment``.
        scale: the random resized crop's area range; None: no random crop (deterministic, as evaluation).
        hflip: horizontal flip probability.
        color_jitter: brightness/contrast/saturation jitter strength (0: off; automatic policies replace it).
        auto_augment: a timm auto-augment string, ``TRIVIAL``, or None.
        description: one line for documentation.
    """

    name: str
    scale: tuple[float, float] | None
    hflip: float
    color_jitter: float
    auto_augment: str | None
    description: str


AUGMENTS: Registry[AugmentInfo] = Registry("augment", "data.augment")
IMAGENET_SCALE = (0.08, 1.0)


def register(info: AugmentInfo) -> AugmentInfo:
    """Add ``info`` to ``AUGMENTS`` under its name (a name already registered raises)."""
    return AUGMENTS.register(info.name)(info)


register(AugmentInfo("none", None, 0.0, 0.0, None, "none: resize (+ centre crop per crop_pct) and normalise"))
register(AugmentInfo("light", (0.75, 1.0), 0.5, 0.0, None, "a crop of 75-100% of the area, flips"))
register(
    AugmentInfo(
        "timm", IMAGENET_SCALE, 0.5, 0.4, None, "timm's ImageNet default: 8-100% crops, flips, jitter"
    )
)
register(AugmentInfo("randaugment", IMAGENET_SCALE, 0.5, 0.0, "rand-m9-mstd0.5-inc1", "timm + RandAugment"))
register(
    AugmentInfo("autoaugment", IMAGENET_SCALE, 0.5, 0.0, "original", "timm + AutoAugment (ImageNet policy)")
)
register(
    AugmentInfo("trivialaugment", IMAGENET_SCALE, 0.5, 0.0, TRIVIAL, "timm + torchvision TrivialAugmentWide")
)


def _auto_augment(value: str) -> AugmentInfo:
    """A timm auto-augment string (``rand-m9-mstd0.5``, ``augmix-m5-w4-d2``, ``original``, ``v0``, ``3a``) on
    timm's default crops and flips; RecipeError when timm cannot build it."""
    from timm.data import create_transform

    try:
        create_transform(input_size=32, is_training=True, auto_augment=value)
    except (AssertionError, KeyError, ValueError, IndexError, TypeError) as error:
        raise RecipeError(
            "data.augment",
            f"unknown augment {value!r} ({error or 'timm cannot parse it'}); choose one of: "
            f"{', '.join(AUGMENTS)}, or a timm auto-augment string such as rand-m9-mstd0.5",
        ) from None
    return AugmentInfo(value, IMAGENET_SCALE, 0.5, 0.0, value, f"timm + auto-augment {value}")


def augment_info(value: str) -> AugmentInfo:
    """The registered augmentation ``value``, or a timm auto-augment string's."""
    if value in AUGMENTS:
        return AUGMENTS.get(value)
    if re.fullmatch(r"[a-z0-9]+(-[a-z0-9.]+)*", value):
        return _auto_augment(value)
    return AUGMENTS.get(value)  # lists the valid names


@dataclass(frozen=True)
class ImagePreparation:
    """How images are prepared: the image keys of ``ImageClassificationData`` (``data.X`` in errors).

    The default augmentation is ``none`` (training images prepared as evaluation's), chosen by measurement
    rather than inherited from ImageNet pre-training: on two small low-resolution image sets (8x8 digits,
    25x25 faces; ``bench/images.py``, EfficientNet-Lite0 with ImageNet weights, full fine-tunes and linear
    probes, 3 seeds) ``none`` was the best, or within the seeds' spread of the best, in every case. On
    digits ``light`` lost in both (full 0.52 against 0.74; with 3x the epochs 0.82 against 0.86), most in
    linear probes, where a frozen backbone cannot learn the invariances; timm's ImageNet default, whose
    8-100% crops cut most of a small image away, lost everywhere (0.32 against 0.74). Choose ``light``,
    ``timm`` or an automatic policy for long full fine-tunes where overfitting is the risk (large natural
    images were not measured), and set ``hflip: 0`` where a mirror image is another class.

    Args:
        image_size: the input size, an int (square) or [height, width]; default: the model's.
        augment: ``none``, ``light``, ``timm``, ``randaugment``, ``trivialaugment``, ``autoaugment``, or a
            timm auto-augment string (``rand-m9-mstd0.5``).
        scale: the random resized crop's area range [min, max] in (0, 1]; default: the augmentation's.
        hflip: horizontal flip probability; default: the augmentation's (0.5; set 0 for digits, text...).
        color_jitter: brightness/contrast/saturation jitter strength; default: the augmentation's.
        re_prob: random erasing probability (after normalisation).
        crop_pct: evaluation: the share of the resized image the centre crop keeps; default: the model's.
        interpolation: the resize filter (train and evaluation); default: the model's.
        mixup: MixUp alpha (0: off); training batches only.
        cutmix: CutMix alpha (0: off); with both, each batch takes one of them at random.
    """

    image_size: int | tuple[int, int] | None = None
    augment: str = DEFAULT_AUGMENT
    scale: tuple[float, float] | None = None
    hflip: float | None = None
    color_jitter: float | None = None
    re_prob: float = 0.0
    crop_pct: float | None = None
    interpolation: Interpolation | None = None
    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        self._check_size()
        info = augment_info(self.augment)
        if self.scale is not None:
            low, high = self.scale
            require(
                0 < low <= high <= 1,
                "data.scale",
                f"must be [min, max] with 0 < min <= max <= 1, got {list(self.scale)}",
            )
        for key in ("hflip", "re_prob"):
            value = getattr(self, key)
            require(
                value is None or 0 <= value <= 1,
                f"data.{key}",
                f"must be a probability in [0, 1], got {value}",
            )
        for key in ("color_jitter", "mixup", "cutmix"):
            value = getattr(self, key)
            require(value is None or value >= 0, f"data.{key}", f"must be 0 or more, got {value}")
        require(
            self.interpolation is None or self.interpolation in get_args(Interpolation),
            "data.interpolation",
            f"unknown filter {self.interpolation!r}; choose one of: {', '.join(get_args(Interpolation))}",
        )
        require(
            self.crop_pct is None or 0 < self.crop_pct <= 1,
            "data.crop_pct",
            f"must be in (0, 1] (1: no crop), got {self.crop_pct}",
        )
        if info.scale is None:
            for key in ("scale", "hflip", "color_jitter", "re_prob"):
                value = getattr(self, key)
                require(
                    not value,
                    f"data.{key}",
                    f"augment none prepares training images as evaluation does; drop {key} or set augment: light",
                )

    def _check_size(self) -> None:
        size = self.image_size
        sides = [size] if isinstance(size, int) else list(size or ())
        valid = size is None or (len(sides) in (1, 2) and all(isinstance(s, int) and s > 0 for s in sides))
        shown = list(size) if isinstance(size, tuple | list) else size
        require(valid, "data.image_size", f"must be a positive int or [height, width], got {shown}")

    def eval_config(self, base: ImageConfig) -> ImageConfig:
        """``base`` (the backbone's) with this preparation's size, crop and filter: the evaluation
        preprocessing, and what the export records."""
        size = self.image_size
        if size is not None:
            size = (size, size) if isinstance(size, int) else tuple(size)
            require(
                not base.fixed_size or size == base.size,
                "data.image_size",
                f"the model takes {base.size[0]}x{base.size[1]} images only (a fixed input size); drop image_size",
            )
        return replace(
            base,
            size=size or base.size,
            crop_pct=self.crop_pct or base.crop_pct,
            interpolation=self.interpolation or base.interpolation,
        )

    def transform(self, base: ImageConfig, train: bool) -> Callable[[Any], Any]:
        """PIL image -> float tensor ``(C, H, W)``: the training transform when ``train``, else evaluation's."""
        return train_transform(self, base) if train else eval_transform(self, base)


def eval_transform(preparation: ImagePreparation, base: ImageConfig) -> Callable[[Any], Any]:
    """Resize (+ centre crop per ``crop_pct``) and normalise, as ``preparation.eval_config(base)`` says."""
    from timm.data import create_transform

    return create_transform(**preparation.eval_config(base).timm_args(), is_training=False)


def train_transform(preparation: ImagePreparation, base: ImageConfig) -> Callable[[Any], Any]:
    """timm's training transform with the augmentation's settings (keys given in the recipe win)."""
    from timm.data import create_transform

    info = augment_info(preparation.augment)
    if info.scale is None:
        return eval_transform(preparation, base)
    config = preparation.eval_config(base)
    jitter = info.color_jitter if preparation.color_jitter is None else preparation.color_jitter
    arguments = {
        "input_size": (3, *config.size),
        "is_training": True,
        "scale": preparation.scale or info.scale,
        "hflip": info.hflip if preparation.hflip is None else preparation.hflip,
        "color_jitter": jitter or None,  # timm adds a (no-op) ColorJitter for 0
        "auto_augment": info.auto_augment if info.auto_augment != TRIVIAL else None,
        "interpolation": config.interpolation,
        "mean": config.mean,
        "std": config.std,
        "re_prob": preparation.re_prob,
    }
    if info.auto_augment != TRIVIAL:
        return create_transform(**arguments)
    from torchvision import transforms

    # timm's three stages: crops and flips, colour (which an automatic policy replaces, as timm does for its
    # own), then tensor, normalisation and erasing.
    crops, _, final = create_transform(**arguments, separate=True)
    return transforms.Compose([*crops.transforms, transforms.TrivialAugmentWide(), *final.transforms])


class BatchMixer:
    """MixUp/CutMix of a training batch with timm's ``Mixup`` (one mix per batch).

    ``pixel_values`` become the mixed images; ``labels`` stay the original classes (for metrics) and
    ``targets`` holds the soft targets ``(B, C)`` the loss reads. timm mixes a batch with its reverse, so in
    a batch of odd size the last row stays unmixed (its target is one-hot). Label smoothing is the task's
    (``model.label_smoothing`` applies to soft targets as timm's Mixup applies it).
    """

    def __init__(self, mixup: float, cutmix: float, num_classes: int) -> None:
        from timm.data import Mixup

        self.mixup = mixup
        self.cutmix = cutmix
        self.num_classes = num_classes
        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0, num_classes=num_classes)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        labels, pixels = batch[LABELS], batch["pixel_values"].clone()
        targets = F.one_hot(labels, self.num_classes).float()
        even = len(labels) - len(labels) % 2
        if even:
            # Mixup works in place, here on a view: the first `even` rows of the copy are mixed.
            _, mixed = self.mix(pixels[:even], labels[:even])
            targets = torch.cat([mixed.to(targets.dtype), targets[even:]])
        return {**batch, "pixel_values": pixels, TARGETS: targets}

    def __repr__(self) -> str:
        parts = [
            f"MixUp alpha {self.mixup}" if self.mixup else "",
            f"CutMix alpha {self.cutmix}" if self.cutmix else "",
        ]
        return f"{' or '.join(p for p in parts if p)} (timm Mixup, one per batch)"


def batch_mixer(preparation: ImagePreparation, num_classes: int) -> BatchMixer | None:
    """The training batches' mixer, or None without ``mixup``/``cutmix``."""
    if not (preparation.mixup or preparation.cutmix):
        return None
    return BatchMixer(preparation.mixup, preparation.cutmix, num_classes)


def describe(transform: Callable[[Any], Any]) -> str:
    """A transform as one line: its steps, each as its repr on one line."""
    steps = getattr(transform, "transforms", [transform])
    return " > ".join(_step(step) for step in steps)


def _step(step: Any) -> str:
    mean, std = getattr(step, "mean", None), getattr(step, "std", None)
    if type(step).__name__ == "Normalize" and mean is not None:
        return f"Normalize(mean={_numbers(mean)}, std={_numbers(std)})"
    text = " ".join(repr(step).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _numbers(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
