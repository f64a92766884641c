"""ClassificationTask on images: the soft-target loss of mixed batches, the teacher cache, the plan's image
section and exports that reload (plain timm / transformers) with validation's preprocessing."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finetune import ClassificationTask, Distillation
from finetune.backbones import Backbone
from finetune.cli import main
from finetune.data import ImageClassificationData
from finetune.data.transforms import TARGETS
from finetune.errors import RecipeError
from tests.helpers.recipes import image_recipe, write


@pytest.fixture
def vit(tiny_timm_checkpoint) -> Backbone:
    return Backbone(name="timm:test_vit", checkpoint=str(tiny_timm_checkpoint))


@pytest.fixture(scope="module")
def tiny_hf_vit(tmp_path_factory):
    """A random 2-layer HF ViT with its image processor (32x32, resized without keeping the aspect ratio)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    directory = tmp_path_factory.mktemp("tiny-hf-vit")
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(30, 50, 3), dtype=np.uint8))


def test_a_mixed_batch_takes_the_soft_target_cross_entropy_and_metrics_keep_the_labels(vit):
    from timm.loss import SoftTargetCrossEntropy

    task = ClassificationTask(vit, labels=["a", "b", "c"], label_smoothing=0.1)
    task.configure_model()
    task.eval()
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.3, 0.7, 0.0], [0.0, 0.4, 0.6], [0.0, 0.6, 0.4]])
    batch = {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "labels": labels,
        "index": torch.arange(4),
        TARGETS: targets,
    }
    loss = task.training_step(batch, 0)
    with torch.no_grad():
        logits = task({"pixel_values": batch["pixel_values"]})
    smoothed = targets * 0.9 + 0.1 / 3  # label smoothing as timm's Mixup applies it to mixed targets
    by_hand = -(smoothed * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)
    assert torch.allclose(loss, SoftTargetCrossEntropy()(logits, smoothed), atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))
    expected_accuracy = (logits.argmax(-1) == labels).float().mean()  # share of rows right
    assert torch.allclose(task.train_metrics.compute()["train/acc"], expected_accuracy)


def test_evaluation_ignores_soft_targets(vit):
    task = ClassificationTask(vit, labels=["a", "b"])
    task.configure_model()
    task.eval()
    labels = torch.tensor([0, 1])
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": labels, TARGETS: torch.full((2, 2), 0.5)}
    with torch.no_grad():
        loss = task._shared_step(batch, "val")
        assert torch.allclose(loss, F.cross_entropy(task(batch), labels))


def fit(task, data, tmp_path, callbacks=(), steps=2) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )
    trainer.fit(task, data)
    return trainer


def mixed_data(image_folder, backbone, **keys) -> ImageClassificationData:
    return ImageClassificationData(
        train=str(image_folder),
        val_fraction=0.0,
        batch_size=4,
        backbone=backbone,
        augment="none",
        mixup=0.4,
        **keys,
    )


def test_the_teacher_cache_is_refused_for_mixed_batches(vit, image_folder, tmp_path):
    distillation = Distillation(teacher=vit, cache_teacher=True)
    with pytest.raises(RecipeError, match=r"cache_teacher: the train transform augments \(MixUp alpha 0.4"):
        fit(ClassificationTask(vit), mixed_data(image_folder, vit), tmp_path, [distillation])


def test_distillation_trains_on_mixed_batches(vit, image_folder, tmp_path):
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sorted(batch))

    task = ClassificationTask(vit)
    fit(task, mixed_data(image_folder, vit, cutmix=1.0), tmp_path, [Distillation(teacher=vit), Record()])
    assert seen and all(TARGETS in keys for keys in seen)
    assert task.image_config.size == (160, 160)  # recorded from the data when the model was built


def test_a_timm_export_reloads_with_the_evaluation_preprocessing(vit, image_folder, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    data = ImageClassificationData(
        train=str(image_folder), backbone=vit, image_size=48, crop_pct=1.0, interpolation="bilinear"
    )
    task = ClassificationTask(vit, labels=data.labels, image_config=data.image_config())
    task.configure_model()
    exported = timm.create_model(f"local-dir:{task.export(tmp_path / 'export')}", pretrained=True)
    config = resolve_data_config({}, model=exported)
    assert {
        key: tuple(v) if isinstance(v, list) else v for key, v in config.items()
    } == data.image_config().timm_args()
    assert (config["input_size"], config["crop_pct"], config["interpolation"]) == (
        (3, 48, 48),
        1.0,
        "bilinear",
    )
    image = picture()
    assert torch.equal(create_transform(**config)(image), data.transform(train=False)(image))


def test_a_hugging_face_export_saves_a_processor_that_prepares_as_validation(tiny_hf_vit, tmp_path):
    from transformers import AutoImageProcessor

    backbone = f"hf:{tiny_hf_vit}"
    data = ImageClassificationData(
        backbone=backbone, crop_pct=0.8, interpolation="bicubic", labels=["a", "b"]
    )
    config = data.image_config()
    assert (config.size, config.crop_pct, config.crop_mode, config.mean) == (
        (32, 32),
        0.8,
        "squash",
        (0.5, 0.5, 0.5),
    )
    task = ClassificationTask(backbone, labels=["a", "b"], image_config=config)
    task.configure_model()
    processor = AutoImageProcessor.from_pretrained(task.export(tmp_path / "export"))
    assert (processor.size["height"], processor.crop_size["height"], processor.do_center_crop) == (
        40,
        32,
        True,
    )
    image = picture()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    # Transformers resizes with torchvision, validation with PIL: they differ by at most one 8-bit step.
    assert torch.allclose(pixels, data.transform(train=False)(image), atol=2 / 255 / 0.5 + 1e-4)


def test_hugging_face_training_uses_the_same_keys(tiny_hf_vit, image_folder):
    data = ImageClassificationData(
        train=str(image_folder), backbone=f"hf:{tiny_hf_vit}", augment="light", hflip=0.0, batch_size=4
    )
    data.setup("fit")
    assert (
        type(data.split_dataset("train").transform.transforms[0]).__name__
        == "RandomResizedCropAndInterpolation"
    )
    assert next(iter(data.train_dataloader()))["pixel_values"].shape == (4, 3, 32, 32)


@pytest.mark.slow
def test_a_recipe_with_image_keys_plans_trains_and_exports(
    tiny_timm_checkpoint, image_folder, tmp_path, caplog
):
    import logging

    import timm
    from timm.data import resolve_data_config

    recipe = image_recipe(tiny_timm_checkpoint, image_folder, tmp_path / "runs")
    keys = {"image_size": 64, "crop_pct": 1.0, "augment": "light", "mixup": 0.2}
    recipe["data"]["init_args"].update(keys)
    path = write(recipe, tmp_path / "recipe.yaml")
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert main(["plan", str(path)]) == 0
    assert (
        "Image preparation\ntrain: RandomResizedCropAndInterpolation(size=(64, 64), scale=(0.75, 1.0)"
        in caplog.text
    )
    assert "eval: Resize(size=64" in caplog.text and "train batches: MixUp alpha 0.2" in caplog.text

    assert main([str(path)]) == 0
    run = tmp_path / "runs" / "recipe" / "version_0"
    assert "train: RandomResizedCropAndInterpolation(size=(64, 64)" in (run / "plan.txt").read_text()
    assert json.loads((run / "export" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [
        3,
        64,
        64,
    ]
    exported = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True)
    assert resolve_data_config({}, model=exported)["input_size"] == (3, 64, 64)
    assert resolve_data_config({}, model=exported)["crop_pct"] == 1.0


def test_a_bad_image_key_ends_the_cli_in_one_line(tiny_timm_checkpoint, image_folder, tmp_path, capsys):
    recipe = image_recipe(tiny_timm_checkpoint, image_folder, tmp_path / "runs")
    recipe["data"]["init_args"]["augment"] = "heavy"
    assert main(["plan", str(write(recipe, tmp_path / "bad.yaml"))]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("finetune: error: data.augment: unknown augment 'heavy'")
    )
