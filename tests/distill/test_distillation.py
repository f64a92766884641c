"""Distillation on tiny models: the KD formula, a frozen teacher that never trains or leaves eval mode and
is never saved, feature projections, teacher caching, and clear errors for mismatched teachers."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

from finetune import ClassificationTask, Distillation, FeatureMatch, RecipeError, SFTTask
from finetune.data import InstructionData, TextClassificationData
from finetune.distill.losses import LogitKD, TeacherOutputs, kd_per_item
from finetune.tasks.loss_terms import StepOutputs

LABELS = ["negative", "positive"]


def by_hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T² · Σ p_teacher (log p_teacher - log p_student), written out with exp/log."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(-1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(-1, keepdim=True)
    return t**2 * (p_t * (p_t.log() - p_s.log())).sum(-1)


def test_kd_loss_is_the_formula_by_hand_with_alpha_and_t_squared(tiny_bert_dir):
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.3, -2.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [-0.5, 2.5, 0.1]])
    alpha, t = 0.3, 4.0
    expected_kl = by_hand_kl(student, teacher, t)
    assert torch.allclose(kd_per_item(student, teacher, t), expected_kl, atol=1e-6)

    task = ClassificationTask(str(tiny_bert_dir), labels=LABELS)
    task.add_loss_term(LogitKD(lambda: TeacherOutputs(teacher), alpha, t))
    task_loss = torch.tensor(0.9)
    total = task.total_loss(StepOutputs(student, {}, task_loss), batch_size=2)
    assert torch.allclose(total, alpha * task_loss + (1 - alpha) * expected_kl.mean(), atol=1e-6)


def test_token_kd_sums_over_response_positions_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    term = LogitKD(lambda: TeacherOutputs(teacher), alpha=0.5, temperature=2.0)
    outputs = StepOutputs(student, {}, torch.tensor(3.0), reduction="sum", mask=mask)
    contribution = term(outputs)
    assert torch.allclose(contribution.loss, 0.5 * by_hand_kl(student, teacher, 2.0)[mask].sum(), atol=1e-5)
    changed = teacher.clone()
    changed[~mask] = 100.0  # teacher logits outside responses must not matter
    term.teacher = lambda: TeacherOutputs(changed)
    assert torch.allclose(term(outputs).loss, contribution.loss)


class Watch(pl.Callback):
    """Records the teacher's mode during every training batch and the optimizer's parameters."""

    def __init__(self, distillation: Distillation) -> None:
        self.distillation = distillation
        self.teacher_training: list[bool] = []

    def on_train_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        model = self.distillation.teacher.model
        self.teacher_training.append(any(module.training for module in model.modules()))
        self.optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.teacher = model
        self.student_training = pl_module.model.training


def fit(task, data, callbacks, tmp_path, **trainer_args):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=trainer_args.pop("max_steps", 3),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.CSVLogger(tmp_path),
        callbacks=callbacks,
        **trainer_args,
    )
    trainer.fit(task, data)
    return trainer


def text_data(backbone, csv, **kwargs):
    return TextClassificationData(
        train=str(csv), val_fraction=0.0, batch_size=8, backbone=str(backbone), **kwargs
    )


def test_teacher_is_frozen_in_eval_mode_and_never_in_optimizer_or_checkpoint(
    tiny_bert_dir, bert_teacher, text_csv, tmp_path
):
    from finetune.distill.teacher import load_teacher

    before = {
        n: p.clone()
        for n, p in load_teacher(str(bert_teacher), "classifier", LABELS).model.named_parameters()
    }
    distillation = Distillation(teacher=str(bert_teacher), alpha=0.5, temperature=2.0)
    watch = Watch(distillation)
    task = ClassificationTask(str(tiny_bert_dir))
    trainer = fit(task, text_data(tiny_bert_dir, text_csv), [distillation, watch], tmp_path)

    teacher = watch.teacher
    assert watch.teacher_training == [False, False, False] and watch.student_training
    assert teacher.config.hidden_dropout_prob > 0  # dropout exists, and was off
    for name, parameter in teacher.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
        assert torch.equal(parameter, before[name]), name
        assert id(parameter) not in watch.optimized, name
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, watch.start[n])}
    assert changed == set(watch.start)  # full strategy: every student weight moved
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(task.state_dict()) and all(k.startswith("model.") for k in state)
    teacher_shapes = {tuple(p.shape) for p in teacher.parameters()}
    assert not any(tuple(v.shape) in teacher_shapes and v.shape[-1] == 48 for v in state.values())
    logged = set(json.loads(json.dumps(list(trainer.logged_metrics))))
    assert {"train/loss", "train/task_loss", "train/kd_loss"} <= logged


def test_feature_kd_projection_shapes_and_gradients(tiny_bert_dir, bert_teacher, text_csv, tmp_path):
    matches = [FeatureMatch("pooled", "pooled", "mse"), FeatureMatch("hidden.1", "hidden.2", "cosine", 0.5)]
    distillation = Distillation(teacher=str(bert_teacher), alpha=0.5, features=matches)

    class Gradients(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.names = [n for g in optimizer.param_groups for n in g["names"]]
            self.student = [p.grad is not None for p in pl_module.model.parameters()]
            self.projection = [p.grad is not None for p in pl_module.loss_modules.parameters()]
            self.teacher = [p.grad is None for p in distillation.teacher.model.parameters()]
            self.shapes = [tuple(p.weight.shape) for p in pl_module.loss_modules["feature"]]

        def on_fit_end(self, trainer, pl_module):
            self.export = pl_module.export(tmp_path / "export")  # the projection is still registered here

    gradients = Gradients()
    task = ClassificationTask(str(tiny_bert_dir))
    trainer = fit(task, text_data(tiny_bert_dir, text_csv), [distillation, gradients], tmp_path, max_steps=1)

    assert gradients.shapes == [(48, 32), (48, 32)]
    assert (
        "loss_modules.feature.0.weight" in gradients.names
        and "loss_modules.feature.1.bias" in gradients.names
    )
    assert all(gradients.student) and all(gradients.projection) and all(gradients.teacher)
    assert "train/feature_loss" in trainer.logged_metrics

    from safetensors.torch import load_file

    assert not any("feature" in key for key in load_file(gradients.export / "model.safetensors"))
    assert not any(k.startswith("loss_modules") for k in task.state_dict()) and not task.loss_terms


def test_teacher_cache_runs_the_teacher_once_per_sample(tiny_bert_dir, bert_teacher, text_csv, tmp_path):
    distillation = Distillation(teacher=str(bert_teacher), cache_teacher=True)
    calls = []

    class Count(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            outputs = distillation.teacher.outputs
            distillation.teacher.outputs = lambda *a: calls.append(1) or outputs(*a)

    data = text_data(tiny_bert_dir, text_csv, limit=32)
    fit(ClassificationTask(str(tiny_bert_dir)), data, [distillation, Count()], tmp_path, max_steps=8)
    assert (
        len(calls) == 4 and len(distillation.cache) == 32
    )  # 2 epochs of 4 batches; the teacher ran in the first


def test_cache_is_refused_with_augmenting_image_transforms(tiny_timm_checkpoint, image_folder, tmp_path):
    from finetune.data import ImageClassificationData

    backbone = {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}
    data = ImageClassificationData(
        train=str(image_folder), val_fraction=0.0, batch_size=4, backbone=backbone, augment="light"
    )
    distillation = Distillation(teacher=backbone, cache_teacher=True)
    with pytest.raises(RecipeError, match="cache_teacher: the train transform augments .*Random"):
        fit(ClassificationTask(backbone), data, [distillation], tmp_path)


def test_mismatched_class_counts_name_the_keys(tiny_bert_dir, three_class_teacher, text_csv, tmp_path):
    distillation = Distillation(teacher=str(three_class_teacher))
    with pytest.raises(RecipeError) as error:
        fit(
            ClassificationTask(str(tiny_bert_dir)),
            text_data(tiny_bert_dir, text_csv),
            [distillation],
            tmp_path,
        )
    assert error.value.key == "trainer.callbacks.Distillation.teacher"
    assert "3 classes" in error.value.message and "model.labels" in error.value.message


def instruction_data(tmp_path, backbone):
    rows = [{"prompt": f"say {w}", "response": f"{w} world"} for w in ["hello", "one", "two", "three"] * 2]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return InstructionData(train=str(path), val_fraction=0.0, batch_size=4, backbone=str(backbone))


def test_mismatched_vocabularies_name_the_keys(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.models import make_tokenizer

    other = tmp_path / "other-llama"
    tokenizer = make_tokenizer(other)  # BERT word pieces: other tokens, other ids
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(other)
    task = SFTTask(str(tiny_llama_dir), strategy="lora", samples=0)
    with pytest.raises(RecipeError) as error:
        fit(task, instruction_data(tmp_path, tiny_llama_dir), [Distillation(teacher=str(other))], tmp_path)
    assert error.value.key == "trainer.callbacks.Distillation.teacher"
    assert "tokenizer" in error.value.message and "model.backbone" in error.value.message


def test_lora_sft_student_learns_from_a_larger_teacher_on_response_tokens(
    tiny_llama_dir, llama_teacher, tmp_path
):
    distillation = Distillation(
        teacher=str(llama_teacher), alpha=0.5, temperature=2.0, teacher_dtype="bfloat16"
    )
    watch = Watch(distillation)
    task = SFTTask(str(tiny_llama_dir), strategy="lora", samples=0)
    trainer = fit(
        task, instruction_data(tmp_path, tiny_llama_dir), [distillation, watch], tmp_path, max_steps=2
    )
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, watch.start[n])}
    assert changed and all("lora_" in n for n in changed)
    assert watch.teacher_training == [False, False]
    assert next(watch.teacher.parameters()).dtype == torch.bfloat16
    assert {"train/loss", "train/task_loss", "train/kd_loss"} <= set(trainer.logged_metrics)
