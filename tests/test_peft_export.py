"""Adapter runs export: adapters alone load with plain peft, merged weights load without peft or finetune;
logits match the trained model's. Checkpoints hold only trained weights, and resume from them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.strategies import LoRA, QLoRA
from finetune.tasks import ClassificationTask, SFTTask
from tests.helpers.batches import LABELS, image_batch, lm_batch, text_batch


def trained(task):
    """Configure the model and move every trained weight off its initial value (LoRA's B starts at zero)."""
    task.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for _, parameter in task.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return task.eval()


def test_hf_classifier_adapter_and_merged_exports(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    task = trained(ClassificationTask(str(tiny_bert_dir), strategy=LoRA(rank=4), labels=LABELS))
    batch = text_batch(tiny_bert_dir)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = task(batch)

    adapter = task.export(tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(LABELS))
    with torch.no_grad():
        assert torch.allclose(
            PeftModel.from_pretrained(base, adapter).eval()(**inputs).logits, expected, atol=1e-5
        )

    merged = task.export(tmp_path / "merged", merge=True)
    assert not any("lora" in key for key in load_file(merged / "model.safetensors"))
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, expected, atol=1e-5)
    assert json.loads((merged / "labels.json").read_text()) == LABELS
    assert any("lora_A" in n for n, _ in task.named_parameters())  # the task's own model keeps its adapters


def test_timm_adapter_and_merged_exports(tiny_timm_checkpoint, tmp_path):
    import timm
    from peft import PeftModel

    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    task = trained(ClassificationTask(backbone, strategy=LoRA(rank=2), labels=LABELS))
    batch = image_batch()
    with torch.no_grad():
        expected = task(batch)
    merged = task.export(tmp_path / "merged", merge=True)
    plain = timm.create_model(f"local-dir:{merged}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.allclose(plain(batch["pixel_values"]), expected, atol=1e-5)
    adapter = task.export(tmp_path / "adapter")
    base = timm.create_model(
        "test_vit",
        num_classes=len(LABELS),
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tiny_timm_checkpoint)},
    )
    with torch.no_grad():
        assert torch.allclose(
            PeftModel.from_pretrained(base, adapter).eval()(batch["pixel_values"]), expected, atol=1e-5
        )


def test_qlora_merged_export_is_dequantised_plain_model(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    task = trained(SFTTask(str(tiny_llama_dir), strategy=QLoRA(compute_dtype="float32")))
    batch = lm_batch()
    with torch.no_grad():
        expected = task(batch)
    merged = task.export(tmp_path / "merged", merge=True)
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The dequantised NF4 weights are exactly what the 4-bit layers computed with: only float rounding differs.
    assert torch.allclose(logits, expected, atol=1e-4)


@pytest.mark.slow
def test_resume_from_adapter_only_checkpoint_restores_optimizer_state(tiny_llama_dir, tmp_path):
    import lightning.pytorch as pl

    from finetune.data import InstructionData

    rows = [{"prompt": f"say {w}", "response": f"{w} world"} for w in ["hello", "one", "two", "three"] * 3]
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows))

    def run(max_epochs, callbacks=(), ckpt_path=None):
        task = SFTTask(
            str(tiny_llama_dir), strategy=QLoRA(compute_dtype="float32", rank=2), samples=1, max_new_tokens=2
        )
        data = InstructionData(
            train=str(data_file), val_fraction=0.25, batch_size=4, backbone=str(tiny_llama_dir)
        )
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), *callbacks],
        )
        trainer.fit(task, data, ckpt_path=ckpt_path)
        return task

    first = run(1)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable  # adapters only: no 4-bit base weights

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    capture = Capture()
    run(2, [capture], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    saved = checkpoint["optimizer_states"][0]["state"]
    assert saved and set(saved) == set(capture.optimizer["state"])
    for index, state in saved.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(capture.optimizer["state"][index][name], state[name])
    assert all(torch.equal(capture.weights[n], checkpoint["state_dict"][n]) for n in trainable)
