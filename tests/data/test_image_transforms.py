"""Image preparation (finetune.data.transforms): the transform each key builds, MixUp/CutMix batches, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.backbones import Backbone
from finetune.backbones.base import ImageConfig
from finetune.data import ImageClassificationData
from finetune.data.transforms import TARGETS, BatchMixer, ImagePreparation, describe
from finetune.errors import RecipeError

BASE = ImageConfig(
    size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic", crop_pct=0.875
)


def picture(width: int = 20, height: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def steps(transform) -> list[str]:
    return [type(step).__name__ for step in transform.transforms]


@pytest.mark.parametrize(
    ("augment", "expected"),
    [
        (
            "light",
            ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "MaybeToTensor", "Normalize"],
        ),
        (
            "timm",
            [
                "RandomResizedCropAndInterpolation",
                "RandomHorizontalFlip",
                "ColorJitter",
                "MaybeToTensor",
                "Normalize",
            ],
        ),
        (
            "randaugment",
            [
                "RandomResizedCropAndInterpolation",
                "RandomHorizontalFlip",
                "RandAugment",
                "MaybeToTensor",
                "Normalize",
            ],
        ),
        (
            "autoaugment",
            [
                "RandomResizedCropAndInterpolation",
                "RandomHorizontalFlip",
                "AutoAugment",
                "MaybeToTensor",
                "Normalize",
            ],
        ),
        (
            "trivialaugment",
            [
                "RandomResizedCropAndInterpolation",
                "RandomHorizontalFlip",
                "TrivialAugmentWide",
                "MaybeToTensor",
                "Normalize",
            ],
        ),
        (
            "rand-m9-mstd0.5",
            [
                "RandomResizedCropAndInterpolation",
                "RandomHorizontalFlip",
                "RandAugment",
                "MaybeToTensor",
                "Normalize",
            ],
        ),
        (
            "augmix-m5-w4-d2",
            [
                "RandomResizedCropAndInterpolation",
                "RandomHorizontalFlip",
                "AugMixAugment",
                "MaybeToTensor",
                "Normalize",
            ],
        ),
    ],
)
def test_each_augmentation_builds_its_timm_or_torchvision_steps(augment, expected):
    transform = ImagePreparation(augment=augment).transform(BASE, train=True)
    assert steps(transform) == expected
    assert transform(picture()).shape == (3, 32, 32)


def test_augmentation_settings_reach_the_steps_and_keys_override_them():
    light = ImagePreparation(augment="light").transform(BASE, train=True).transforms
    assert light[0].scale == (0.75, 1.0) and light[1].p == 0.5
    assert ImagePreparation(augment="timm").transform(BASE, train=True).transforms[0].scale == (0.08, 1.0)
    custom = ImagePreparation(augment="timm", scale=(0.5, 0.9), hflip=0.0, color_jitter=0.0, re_prob=0.25)
    transform = custom.transform(BASE, train=True)
    assert steps(transform) == [
        "RandomResizedCropAndInterpolation",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    assert transform.transforms[0].scale == (0.5, 0.9) and transform.transforms[-1].probability == 0.25


def test_none_is_a_deterministic_resize_crop_and_normalise_for_training_and_evaluation():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    preparation = ImagePreparation(augment="none")
    train, evaluate = preparation.transform(BASE, train=True), preparation.transform(BASE, train=False)
    assert steps(train) == steps(evaluate) == ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]
    image = picture()
    torch.manual_seed(0)
    first = train(image)
    torch.manual_seed(1)
    assert torch.equal(first, train(image))
    # By hand: the shorter side to 32 / 0.875 = 36 (bicubic), the centre 32x32, then (x - mean) / std.
    resized = F.center_crop(F.resize(image, 36, interpolation=InterpolationMode.BICUBIC), [32, 32])
    expected = F.normalize(F.to_tensor(resized), BASE.mean, BASE.std)
    assert torch.allclose(first, expected, atol=1e-6)
    assert torch.equal(evaluate(image), first)


def test_evaluation_follows_crop_pct_interpolation_and_image_size():
    config = ImagePreparation(image_size=(24, 40), crop_pct=1.0, interpolation="bilinear").eval_config(BASE)
    assert (config.size, config.crop_pct, config.interpolation) == ((24, 40), 1.0, "bilinear")
    assert (config.mean, config.std) == (BASE.mean, BASE.std)
    transform = ImagePreparation(image_size=(24, 40), crop_pct=1.0).transform(BASE, train=False)
    assert transform(picture(50, 30)).shape == (3, 24, 40)
    assert ImagePreparation(image_size=48).transform(BASE, train=True)(picture()).shape == (3, 48, 48)


def test_image_size_changes_the_batches_of_the_data_module(image_folder, vit_backbone):
    data = ImageClassificationData(
        train=str(image_folder), backbone=vit_backbone, image_size=[48, 64], batch_size=4, augment="light"
    )
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["pixel_values"].shape == (4, 3, 48, 64)
    assert next(iter(data.val_dataloader()))["pixel_values"].shape[1:] == (3, 48, 64)
    assert data.image_config().size == (48, 64)


def test_a_fixed_size_model_refuses_another_image_size(image_folder):
    data = ImageClassificationData(train=str(image_folder), backbone="timm:test_vit3", image_size=64)
    with pytest.raises(RecipeError, match=r"^data\.image_size: the model takes 160x160 images only"):
        data.image_config()


def test_mixup_and_cutmix_give_soft_targets_and_keep_the_labels():
    pixels = torch.randn(5, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 1, 0])
    batch = {"pixel_values": pixels, "labels": labels, "index": torch.arange(5)}
    for mixer in (
        BatchMixer(mixup=1.0, cutmix=0.0, num_classes=3),
        BatchMixer(mixup=0.0, cutmix=1.0, num_classes=3),
    ):
        np.random.seed(0)
        mixed = mixer(batch)
        targets = mixed[TARGETS]
        assert targets.shape == (5, 3) and torch.allclose(targets.sum(-1), torch.ones(5))
        assert torch.equal(mixed["labels"], labels) and torch.equal(
            batch["pixel_values"], pixels
        )  # not mutated
        lam = targets[0, 0].item()  # row 0 (class 0) is mixed with row 3 (class 1): lam of its own class
        assert 0 < lam < 1 and targets[0, 1].item() == pytest.approx(1 - lam)
        # timm mixes a batch with its reverse, so the odd last row stays as it was, one-hot.
        assert torch.equal(mixed["pixel_values"][4], pixels[4]) and targets[4].tolist() == [1.0, 0.0, 0.0]
        assert not torch.equal(mixed["pixel_values"][:4], pixels[:4])


def test_mixup_expects_mixed_pixels_where_lam_says():
    pixels = torch.randn(4, 3, 8, 8)
    np.random.seed(1)
    mixed = BatchMixer(mixup=1.0, cutmix=0.0, num_classes=2)(
        {"pixel_values": pixels, "labels": torch.tensor([0, 0, 1, 1])}
    )
    lam = mixed[TARGETS][0, 0].item()
    assert torch.allclose(mixed["pixel_values"][0], lam * pixels[0] + (1 - lam) * pixels[3], atol=1e-6)


def test_only_training_batches_are_mixed(image_folder, vit_backbone):
    data = ImageClassificationData(
        train=str(image_folder), backbone=vit_backbone, mixup=0.8, cutmix=1.0, batch_size=4, val_fraction=0.25
    )
    data.setup("fit")
    train = next(iter(data.train_dataloader()))
    assert train[TARGETS].shape == (4, 2) and train["labels"].dtype == torch.long
    assert TARGETS not in next(iter(data.val_dataloader()))
    assert data.split_dataset("val").mixer is None


@pytest.mark.parametrize(
    ("keys", "key"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": (32, 0)}, "image_size"),
        ({"augment": "heavy"}, "augment"),
        ({"augment": "Light!"}, "augment"),
        ({"scale": (0.9, 0.5)}, "scale"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"hflip": 1.5}, "hflip"),
        ({"re_prob": -0.1}, "re_prob"),
        ({"color_jitter": -1.0}, "color_jitter"),
        ({"crop_pct": 0.0}, "crop_pct"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"crop_pct": 1.2}, "crop_pct"),
        ({"mixup": -0.2}, "mixup"),
        ({"cutmix": -1.0}, "cutmix"),
        ({"augment": "none", "hflip": 0.5}, "hflip"),
        ({"augment": "none", "scale": (0.5, 1.0)}, "scale"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(keys, key):
    with pytest.raises(RecipeError) as error:
        ImageClassificationData(**keys)
    assert error.value.key == f"data.{key}"
    assert "\n" not in str(error.value)


def test_unknown_augmentations_list_the_valid_ones():
    with pytest.raises(
        RecipeError,
        match=r"choose one of: autoaugment, light, none, randaugment, timm, trivialaugment, or a timm",
    ):
        ImagePreparation(augment="heavy")


def test_describe_puts_each_transform_on_one_line():
    text = describe(ImagePreparation(augment="light").transform(BASE, train=True))
    assert "\n" not in text
    assert text.startswith("RandomResizedCropAndInterpolation(size=(32, 32), scale=(0.75, 1.0)")
    assert text.endswith("Normalize(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))")


def test_the_backbones_default_transform_is_the_default_preparation(vit_backbone):
    default = vit_backbone.image_transform(train=False)
    assert describe(default) == describe(
        ImagePreparation().transform(Backbone.of(vit_backbone).image_config(), False)
    )
