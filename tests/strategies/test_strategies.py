"""Each strategy on a timm and a Hugging Face model: after one optimizer step, exactly the parameters it
names have changed; every frozen parameter (and frozen BatchNorm statistics) is bitwise unchanged."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import RecipeError
from finetune.strategies import STRATEGIES, Freeze, Full, Partial, resolve_strategy
from finetune.tasks import ClassificationTask
from tests.helpers.batches import LABELS, image_batch, text_batch
from tests.helpers.steps import assert_exactly, one_step


@pytest.fixture
def bert(tiny_bert_dir):
    return lambda strategy: ClassificationTask(str(tiny_bert_dir), strategy=strategy, labels=LABELS)


@pytest.fixture
def vit(tiny_timm_checkpoint):
    return lambda strategy: ClassificationTask(
        {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}, strategy=strategy, labels=LABELS
    )


def test_full_trains_everything(bert, vit, tiny_bert_dir):
    assert_exactly(bert("full"), text_batch(tiny_bert_dir), ("model.",))
    assert_exactly(vit("full"), image_batch(), ("model.",))


def test_freeze_trains_only_the_new_head(bert, vit, tiny_bert_dir):
    assert_exactly(bert("freeze"), text_batch(tiny_bert_dir), ("model.classifier.",))
    assert_exactly(vit("freeze"), image_batch(), ("model.head.",))


def test_partial_last_blocks_hf(bert, tiny_bert_dir):
    expected = ("model.bert.encoder.layer.1.", "model.bert.pooler.", "model.classifier.")
    assert_exactly(bert(Partial(last_blocks=1)), text_batch(tiny_bert_dir), expected)


def test_partial_last_blocks_timm(vit):
    # test_vit has 6 blocks; the final norm sits above the last block and trains with it.
    expected = ("model.blocks.4.", "model.blocks.5.", "model.norm.", "model.fc_norm.", "model.head.")
    assert_exactly(vit(Partial(last_blocks=2)), image_batch(), expected)


def test_partial_named_modules(bert, vit, tiny_bert_dir):
    strategy = Partial(last_blocks=0, modules=[r"bert\.embeddings\.LayerNorm"])
    assert_exactly(
        bert(strategy), text_batch(tiny_bert_dir), ("model.bert.embeddings.LayerNorm.", "model.classifier.")
    )
    strategy = Partial(last_blocks=0, modules=[r"blocks\.0\.attn"])
    assert_exactly(vit(strategy), image_batch(), ("model.blocks.0.attn.", "model.head."))


def resnet(strategy, batchnorm="eval"):
    strategy = resolve_strategy(strategy)
    strategy.batchnorm = batchnorm
    return ClassificationTask(
        {"name": "timm:test_resnet", "pretrained": False}, strategy=strategy, labels=LABELS
    )


def test_freeze_keeps_frozen_batchnorm_statistics():
    task = resnet("freeze")
    _, _, before = one_step(task, image_batch(64))
    stats = {n for n in before if n.endswith(("running_mean", "running_var"))}
    assert stats
    after = dict(task.named_buffers())
    assert all(torch.equal(after[n], before[n]) for n in stats)
    assert all(not m.training for m in task.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_batchnorm_train_policy_tracks_statistics_without_training_weights():
    task = resnet("freeze", batchnorm="train")
    changed, _, before = one_step(task, image_batch(64))
    after = dict(task.named_buffers())
    assert any(not torch.equal(after[n], before[n]) for n in before if n.endswith("running_mean"))
    assert changed == {n for n, _ in task.named_parameters() if n.startswith("model.fc.")}


def test_partial_keeps_trained_batchnorm_in_train_mode():
    task = resnet(Partial(last_blocks=1))
    one_step(task, image_batch(64))
    modes = {n: m.training for n, m in task.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(mode for n, mode in modes.items() if n.startswith("model.layer4."))
    assert not any(mode for n, mode in modes.items() if not n.startswith("model.layer4."))


def test_registry_names_and_errors():
    assert set(STRATEGIES) >= {"full", "freeze", "partial"}
    assert isinstance(resolve_strategy("freeze"), Freeze)
    assert resolve_strategy({"name": "partial", "last_blocks": 3}) == Partial(last_blocks=3)
    assert isinstance(resolve_strategy(Full()), Full)
    with pytest.raises(
        RecipeError, match="model.strategy: unknown strategy 'lora2'.*freeze, full, lora, partial, qlora"
    ):
        resolve_strategy("lora2")
    with pytest.raises(KeyError, match="already registered"):
        STRATEGIES.register("full")(Full)


def test_partial_bad_input(bert):
    with pytest.raises(RecipeError, match="model.strategy.last_blocks"):
        bert(Partial(last_blocks=5)).configure_model()
    with pytest.raises(RecipeError, match=r"model.strategy.modules: pattern 'nope\.\*' matches no module"):
        bert(Partial(last_blocks=0, modules=["nope.*"])).configure_model()
