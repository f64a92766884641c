"""lora and qlora on an HF encoder classifier, an HF causal LM and a timm ViT: after one optimizer step
exactly the adapter (and new head) parameters changed; the base is bitwise unchanged."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import RecipeError
from finetune.strategies import LoRA, QLoRA, adapter_parameter_names, resolve_strategy
from finetune.strategies.adapters import adapter_targets
from finetune.tasks import ClassificationTask, SFTTask
from tests.helpers.batches import LABELS, image_batch, lm_batch, text_batch
from tests.helpers.steps import assert_adapters_and, step

CPU_QLORA = {"compute_dtype": "float32"}


def bert(tiny_bert_dir, strategy):
    return ClassificationTask(str(tiny_bert_dir), strategy=strategy, labels=LABELS)


def vit(tiny_timm_checkpoint, strategy):
    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    return ClassificationTask(backbone, strategy=strategy, labels=LABELS)


def test_lora_on_hf_classifier_trains_adapters_and_new_head(tiny_bert_dir):
    task = bert(tiny_bert_dir, "lora")
    assert_adapters_and(task, text_batch(tiny_bert_dir), ("model.classifier.",))
    names = dict(task.named_modules())
    assert "model.bert.encoder.layer.0.attention.self.query.lora_A.default" in names
    assert "model.classifier.lora_A" not in str(list(names))  # the head trains in full, not adapted


def test_lora_on_timm_vit_targets_attention_and_mlp(tiny_timm_checkpoint):
    task = vit(tiny_timm_checkpoint, LoRA(rank=2))
    assert_adapters_and(task, image_batch(), ("model.head.",))
    targets = {name.rpartition(".")[2] for name in adapter_targets(task.model)}
    assert targets == {"qkv", "proj", "fc1", "fc2"}


def test_lora_on_causal_lm_keeps_lm_head_frozen(tiny_llama_dir):
    task = SFTTask(str(tiny_llama_dir), strategy="lora")
    assert_adapters_and(task, lm_batch(), ())
    assert not task.model.lm_head.weight.requires_grad


def test_qlora_base_is_4bit_and_only_adapters_train(tiny_llama_dir, tiny_bert_dir):
    import bitsandbytes as bnb

    task = SFTTask(str(tiny_llama_dir), strategy=QLoRA(**CPU_QLORA))
    assert_adapters_and(task, lm_batch(), ())
    base = task.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_type == "nf4"
    classifier = bert(tiny_bert_dir, QLoRA(**CPU_QLORA))
    assert_adapters_and(classifier, text_batch(tiny_bert_dir), ("model.classifier.",))
    # The new head is kept out of quantisation so it can train.
    assert type(classifier.model.classifier) is torch.nn.Linear


def test_qlora_8bit_and_gradient_checkpointing_still_give_adapter_grads(tiny_llama_dir):
    import bitsandbytes as bnb

    task = SFTTask(str(tiny_llama_dir), strategy=QLoRA(bits=8, gradient_checkpointing=True, **CPU_QLORA))
    assert_adapters_and(task, lm_batch(), ())
    assert isinstance(task.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear8bitLt)
    assert task.model.is_gradient_checkpointing


def test_qlora_training_after_validation_keeps_correct_gradients(tiny_llama_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval forward; training must not see that."""
    task = SFTTask(str(tiny_llama_dir), strategy=QLoRA(**CPU_QLORA))
    task.configure_model()
    b = lm_batch()

    def grads():
        task.train()
        task.zero_grad()
        task.token_losses(b)[0].backward()
        return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}

    first = grads()
    task.eval()
    with torch.no_grad():
        task(b)
    second = grads()
    assert all(torch.allclose(first[n], second[n]) for n in first)


@pytest.mark.parametrize("adapter", ["ia3", "loha", "lokr"])
def test_other_peft_adapters_by_name(tiny_bert_dir, adapter):
    strategy = resolve_strategy(
        {"name": "lora", "adapter": adapter, "rank": 2, "target_modules": ["query", "value"]}
    )
    task = bert(tiny_bert_dir, strategy)
    changed, trainable = step(task, text_batch(tiny_bert_dir))
    adapters = set(adapter_parameter_names(task))
    head = {n for n in trainable if n.startswith("model.classifier.")}
    assert adapters and trainable == adapters | head
    assert changed <= trainable and head <= changed


def test_dora_and_cnn_default_conv_targets(tiny_bert_dir):
    task = bert(
        tiny_bert_dir,
        LoRA(use_dora=True, target_modules=[r"bert\.encoder\.layer\.\d\.attention\.self\.query"]),
    )
    task.configure_model()
    assert any("lora_magnitude_vector" in n for n in adapter_parameter_names(task))
    resnet = ClassificationTask(
        {"name": "timm:test_resnet", "pretrained": False}, strategy="lora", labels=LABELS
    )
    changed, trainable = step(resnet, image_batch(64))
    adapters = set(adapter_parameter_names(resnet))
    head = {n for n, _ in resnet.named_parameters() if n.startswith("model.fc.")}
    # timm zero-initialises each block's last BatchNorm, so inner adapters get no gradient at first.
    assert trainable == adapters | head and changed <= trainable and head <= changed
    bases = [m.get_base_layer() for m in resnet.modules() if hasattr(m, "get_base_layer")]
    assert bases and all(isinstance(b, torch.nn.Conv2d) for b in bases)


def test_bad_lora_and_qlora_input(tiny_bert_dir, tiny_timm_checkpoint):
    with pytest.raises(RecipeError, match=r"model.strategy.target_modules: 'nope' matches no module"):
        bert(tiny_bert_dir, LoRA(target_modules=["query", "nope"])).configure_model()
    with pytest.raises(RecipeError, match=r"model.strategy.modules_to_save: 'nope' matches no module"):
        bert(tiny_bert_dir, LoRA(modules_to_save=["nope"])).configure_model()
    with pytest.raises(
        RecipeError, match=r"model.strategy.adapter: unknown adapter type 'vera'.*ia3, loha, lokr, lora"
    ):
        LoRA(adapter="vera")
    with pytest.raises(RecipeError, match=r"model.strategy: .*needs a Hugging Face model"):
        vit(tiny_timm_checkpoint, QLoRA()).configure_model()
    with pytest.raises(RecipeError, match=r"model.strategy.rank"):
        LoRA(rank=0)
