"""Parameter groups: exact LR and weight decay per parameter, for patterns and layer-wise decay."""

from __future__ import annotations

import logging

import pytest
import torch

from finetune.backbones.layout import discover_layout
from finetune.optim import OptimizerConfig, ParamGroup
from finetune.optim.groups import param_groups


def per_parameter(groups) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight_decay); each parameter must appear in exactly one group."""
    seen: dict[str, tuple[float, float]] = {}
    for group in groups:
        assert len(group["names"]) == len(group["params"])
        for name in group["names"]:
            assert name not in seen, f"{name} is in two groups"
            seen[name] = (group["lr"], group["weight_decay"])
    return seen


@pytest.fixture
def vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3)
    return model, discover_layout(model, ("head",))


@pytest.fixture
def bert(tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    return model, discover_layout(model, ("classifier",))


def test_layer_decay_agrees_with_timm(vit):
    from timm.optim import param_groups_layer_decay

    model, layout = vit
    config = OptimizerConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.6)
    ours = per_parameter(param_groups(model, layout, config))
    reference = {}
    for group in param_groups_layer_decay(
        model, weight_decay=0.05, layer_decay=0.6, no_weight_decay_list=model.no_weight_decay()
    ):
        for parameter in group["params"]:
            name = next(n for n, p in model.named_parameters() if p is parameter)
            reference[name] = (1e-3 * group["lr_scale"], group["weight_decay"])
    assert ours.keys() == reference.keys()
    for name, (lr, decay) in ours.items():
        assert lr == pytest.approx(reference[name][0], rel=1e-12), name
        assert decay == reference[name][1], name


def test_frozen_parameters_are_left_out_and_left_alone(vit):
    model, layout = vit
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(("blocks.5.", "head.")))
    groups = param_groups(model, layout, OptimizerConfig(lr=1.0, layer_decay=0.5))
    ours = per_parameter(groups)
    assert set(ours) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {lr for lr, _ in ours.values()} == {1.0, 0.5}
    assert sum(p.requires_grad for p in model.parameters()) == len(ours)  # nothing changed
    assert all(p.requires_grad for g in groups for p in g["params"])


def test_layer_decay_hf_bert_by_hand(bert):
    model, layout = bert
    ours = per_parameter(
        param_groups(model, layout, OptimizerConfig(lr=1.0, weight_decay=0.1, layer_decay=0.5))
    )
    # 2 blocks: classifier and pooler (above the last block) 1, layer.1 0.5, layer.0 0.25, embeddings 0.125.
    expected_lr = {
        "classifier.weight": 1.0,
        "bert.pooler.dense.weight": 1.0,
        "bert.encoder.layer.1.attention.self.query.weight": 0.5,
        "bert.encoder.layer.0.output.dense.weight": 0.25,
        "bert.embeddings.word_embeddings.weight": 0.125,
        "bert.embeddings.LayerNorm.weight": 0.125,
    }
    for name, lr in expected_lr.items():
        assert ours[name][0] == lr, name
    # no decay on biases, norms and embeddings; decay on the other matrices
    assert ours["bert.embeddings.word_embeddings.weight"][1] == 0.0
    assert ours["bert.embeddings.position_embeddings.weight"][1] == 0.0
    assert ours["bert.encoder.layer.0.output.LayerNorm.weight"][1] == 0.0
    assert ours["classifier.bias"][1] == 0.0
    assert ours["classifier.weight"][1] == 0.1
    assert ours["bert.encoder.layer.0.output.dense.weight"][1] == 0.1
    switched = per_parameter(
        param_groups(model, layout, OptimizerConfig(weight_decay=0.1, decay_norm_and_bias=True))
    )
    assert {decay for _, decay in switched.values()} == {0.1}


def test_patterns_first_match_wins_rest_at_base(bert, caplog):
    model, layout = bert
    config = OptimizerConfig(
        lr=1.0,
        groups=[
            ParamGroup(pattern=r"^classifier\.", lr=10.0),
            ParamGroup(pattern="bert.encoder.layer.1.*", syntax="glob", lr=3.0, weight_decay=0.5),
            ParamGroup(pattern=r"layer\.1\.attention", lr=7.0),  # overlaps the glob: loses
            ParamGroup(pattern=r"nothing_here", lr=2.0),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="finetune"):
        ours = per_parameter(param_groups(model, layout, config))
    assert ours["classifier.weight"] == (10.0, 0.01)
    assert ours["bert.encoder.layer.1.attention.self.query.bias"] == (3.0, 0.5)
    assert ours["bert.encoder.layer.0.attention.self.query.weight"] == (1.0, 0.01)
    assert ours["bert.pooler.dense.bias"] == (1.0, 0.0)
    assert "pattern 'nothing_here' matches no trainable parameter" in caplog.text
    assert "match both 'bert.encoder.layer.1.*' and 'layer\\\\.1\\\\.attention'" in caplog.text


def test_patterns_with_layer_decay_and_lora_parameters_take_their_block(bert):
    from peft import LoraConfig, inject_adapter_in_model

    model, layout = bert
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["query", "value"]), model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name or name.startswith("classifier."))
    config = OptimizerConfig(
        lr=1.0, layer_decay=0.5, groups=[ParamGroup(pattern=r"layer\.0\..*lora_B", lr=9.0)]
    )
    ours = per_parameter(param_groups(model, layout, config))
    assert ours["bert.encoder.layer.1.attention.self.query.lora_A.default.weight"][0] == 0.5
    assert ours["bert.encoder.layer.0.attention.self.value.lora_A.default.weight"][0] == 0.25
    assert ours["bert.encoder.layer.0.attention.self.value.lora_B.default.weight"][0] == 9.0
    assert ours["classifier.weight"][0] == 1.0
    assert len(ours) == 2 * 2 * 2 + 2


def test_groups_carry_names_and_blocks(vit):
    model, layout = vit
    groups = param_groups(model, layout, OptimizerConfig(layer_decay=0.5))
    blocks = [g["block"] for g in groups]
    assert blocks[0] == "embeddings" and blocks[-1] == "head"
    assert "blocks.5+norm" in blocks
    assert len({g["name"] for g in groups}) == len(groups)
    optimizer = torch.optim.AdamW(groups)
    assert optimizer.param_groups[-1]["block"] == "head"  # torch keeps our keys
