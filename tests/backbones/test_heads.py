"""Pooling heads: each pooling equals its formula on a padded batch, sentence-transformers folders default to
their pooling, every strategy trains exactly what it should, and exports load without finetune."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.backbones import Backbone
from finetune.backbones.heads import Head, PooledClassifier, pool
from finetune.errors import RecipeError
from finetune.strategies import LoRA, QLoRA, adapter_parameter_names
from finetune.tasks import ClassificationTask
from tests.helpers.batches import LABELS, text_batch
from tests.helpers.steps import assert_adapters_and, assert_exactly

README = Path(__file__).resolve().parents[2] / "README.md"


def padded_batch():
    """Two sequences of 4 positions: the first has 3 real tokens (right padding), the second 2 (left
    padding); padded positions hold huge values, so pooling any of them shows."""
    torch.manual_seed(0)
    states = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    states[mask == 0] = 1e6
    return states, mask


def test_each_pooling_equals_its_formula_and_never_pools_padding():
    states, mask = padded_batch()
    first, second = states[0, :3], states[1, 2:]
    assert torch.equal(pool(states, mask, "cls"), states[:, 0])
    torch.testing.assert_close(pool(states, mask, "mean"), torch.stack([first.mean(0), second.mean(0)]))
    torch.testing.assert_close(pool(states, mask, "max"), torch.stack([first.amax(0), second.amax(0)]))
    assert torch.equal(pool(states, mask, "last"), torch.stack([states[0, 2], states[1, 3]]))
    pooled = torch.randn(2, 3)
    assert pool(states, mask, "pooler", pooler_output=pooled) is pooled
    with pytest.raises(RecipeError, match=r"^model\.head\.pooling: this model has no pretrained pooler"):
        pool(states, mask, "pooler")


def sentence_transformers_folder(tiny_bert_dir: Path, target: Path, flag: str) -> Path:
    """The tiny BERT laid out as a sentence-transformers model whose Pooling module sets ``flag``."""
    shutil.copytree(tiny_bert_dir, target)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (target / "modules.json").write_text(json.dumps(modules))
    (target / "1_Pooling").mkdir()
    flags = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens")
    (target / "1_Pooling" / "config.json").write_text(json.dumps({f: f == flag for f in flags}))
    return target


def test_sentence_transformers_folders_default_to_their_pooling(tiny_bert_dir, tmp_path):
    mean = sentence_transformers_folder(tiny_bert_dir, tmp_path / "mean", "pooling_mode_mean_tokens")
    cls = sentence_transformers_folder(tiny_bert_dir, tmp_path / "cls", "pooling_mode_cls_token")
    assert Backbone(name=str(mean)).load_classifier(LABELS).model.pooling == "mean"
    assert Backbone(name=str(cls)).load_classifier(LABELS).model.pooling == "cls"
    own = Backbone(name=str(tiny_bert_dir)).load_classifier(LABELS).model
    assert type(own).__name__ == "BertForSequenceClassification"  # a plain model keeps its own head
    chosen = Backbone(name=str(mean)).load_classifier(LABELS, head=Head(pooling="max")).model
    assert chosen.pooling == "max"
    # The pooler is dropped unless the head reads it: it would otherwise sit untrained in the model.
    assert not any("pooler" in name for name, _ in chosen.named_parameters())


def test_the_pooled_logits_are_the_head_on_the_masked_mean(tiny_bert_dir):
    task = ClassificationTask(str(tiny_bert_dir), labels=LABELS, head={"pooling": "mean", "hidden": 8})
    task.configure_model()
    task.eval()
    batch = text_batch(tiny_bert_dir)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    states = task.model.encoder(**inputs).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = task.model.head((states * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(task(batch), expected)


@pytest.mark.parametrize(
    ("strategy", "trained"),
    [
        ("full", ("model.",)),
        ("freeze", ("model.head.",)),
        ("partial", ("model.head.", "model.encoder.encoder.layer.1.")),
    ],
)
def test_strategies_train_exactly_their_parameters_under_a_pooling_head(tiny_bert_dir, strategy, trained):
    task = ClassificationTask(str(tiny_bert_dir), strategy=strategy, labels=LABELS, head={"pooling": "mean"})
    assert_exactly(task, text_batch(tiny_bert_dir), trained)


@pytest.mark.parametrize("strategy", [LoRA(), QLoRA(compute_dtype="float32")], ids=["lora", "qlora"])
def test_adapters_train_with_the_pooling_head(tiny_bert_dir, strategy):
    task = ClassificationTask(str(tiny_bert_dir), strategy=strategy, labels=LABELS, head={"pooling": "mean"})
    assert_adapters_and(task, text_batch(tiny_bert_dir), ("model.head.",))
    assert all(name.startswith("model.encoder.") for name in adapter_parameter_names(task))


def readme_predict_snippet() -> str:
    """The README's example of predicting with an exported pooling head, without finetune."""
    text = README.read_text(encoding="utf-8")
    return re.search(r"<!-- predict-with-head -->\s*```python\n(.*?)```", text, re.S).group(1)


def predict_without_finetune(
    folder: Path, texts: list[str], adapters_on: str | None = None
) -> list[list[float]]:
    """Run the README snippet in a fresh Python where ``import finetune`` fails; its logits."""
    code = readme_predict_snippet().replace('"runs/quickstart/version_0/export"', repr(str(folder)))
    code = code.replace('["the staff were lovely", "never again"]', repr(texts))
    if adapters_on is not None:
        code = code.replace(
            "encoder = AutoModel.from_pretrained(folder)",
            "from peft import PeftModel\n"
            f"encoder = PeftModel.from_pretrained(AutoModel.from_pretrained({adapters_on!r}), folder)",
        )
    blocker = "import sys; sys.modules['finetune'] = None\n"
    script = blocker + code + "\nimport json; print(json.dumps(logits.tolist()))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_export_predicts_the_same_without_finetune(tiny_bert_dir, tmp_path, strategy):
    task = ClassificationTask(
        str(tiny_bert_dir), strategy=strategy, labels=LABELS, head={"pooling": "mean", "hidden": 8}
    )
    task.configure_model()
    with torch.no_grad():
        for parameter in task.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01 * torch.randn_like(parameter))  # a trained-looking head and adapters
    task.eval()
    folder = task.export(tmp_path / "export")
    assert {"head.json", "head.safetensors", "labels.json"} <= {p.name for p in folder.iterdir()}
    texts = ["good movie", "bad day very"]
    from transformers import AutoTokenizer

    batch = dict(AutoTokenizer.from_pretrained(tiny_bert_dir)(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = task(batch)
    shutil.copy(tiny_bert_dir / "tokenizer.json", folder)  # adapter exports hold no tokenizer
    shutil.copy(tiny_bert_dir / "tokenizer_config.json", folder)
    base = str(tiny_bert_dir) if strategy == "lora" else None
    got = torch.tensor(predict_without_finetune(folder, texts, adapters_on=base))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if strategy == "full":
        # finetune reads its own export back, trained head included (as a distillation teacher does).
        again = Backbone(name=str(folder)).load_classifier(LABELS).model.eval()
        assert isinstance(again, PooledClassifier)
        with torch.no_grad():
            torch.testing.assert_close(again(**batch).logits, expected)


def test_timm_pooling_is_global_pool_and_the_export_keeps_it(tiny_timm_checkpoint, tmp_path):
    import timm

    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    task = ClassificationTask(backbone, labels=LABELS, head={"pooling": "avg", "dropout": 0.2})
    task.configure_model()
    assert task.model.global_pool == "avg" and task.model.head_drop.p == 0.2
    folder = task.export(tmp_path / "export")
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).global_pool == "avg"


def test_bad_heads_name_their_key(tiny_bert_dir, tiny_timm_checkpoint):
    with pytest.raises(RecipeError, match=r"^model\.head\.pooling: Hugging Face models pool with one of"):
        Backbone(name=str(tiny_bert_dir)).load_classifier(LABELS, head=Head(pooling="avg"))
    with pytest.raises(RecipeError, match=r"^model\.head\.hidden: timm heads have no hidden layer"):
        Backbone(name="timm:test_vit", checkpoint=str(tiny_timm_checkpoint)).load_classifier(
            LABELS, head=Head(hidden=8)
        )
    with pytest.raises(RecipeError, match=r"^model\.head\.dropout: must be in \[0, 1\)"):
        Head(dropout=1.5)
