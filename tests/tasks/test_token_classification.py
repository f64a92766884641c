"""TokenClassificationTask: entity scores as seqeval computes them, a tagger that learns a rule, every strategy,
per-token distillation, per-word predictions written by PredictionWriter, exports that plain transformers
reloads, and recipes that plan and run from the command line."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from finetune.callbacks import PredictionWriter
from finetune.cli import main
from finetune.data.tagging import TokenTaggingData
from finetune.data.word_tokens import IGNORE
from finetune.distill import Distillation
from finetune.distill.losses import LogitKD, TeacherOutputs
from finetune.errors import RecipeError
from finetune.optim import OptimizerConfig
from finetune.strategies import LoRA, Partial, QLoRA, adapter_parameter_names
from finetune.tasks.token_classification import EntityScores, TokenClassificationTask, word_predictions
from tests.helpers.models import bert_folder
from tests.helpers.recipes import tagging_recipe, write
from tests.helpers.tagging import TAGS, rule_sentences, rule_tags, save_tagger_bert, write_conll


@pytest.fixture(scope="module")
def tagger_bert(tmp_path_factory):
    """A tiny BERT whose word-piece tokenizer splits some words into two sub-tokens."""
    return save_tagger_bert(tmp_path_factory.mktemp("tagger-bert"))


@pytest.fixture
def rule_files(tmp_path):
    """160 train and 40 validation sentences tagged by ``rule_tags``, as CoNLL files."""
    return (
        write_conll(tmp_path / "train.conll", rule_sentences(160, seed=0)),
        write_conll(tmp_path / "val.conll", rule_sentences(40, seed=1)),
    )


def quiet_trainer(tmp_path, **options) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**(defaults | options))


def rule_batch(tagger_bert, tmp_path) -> dict[str, torch.Tensor]:
    path = write_conll(tmp_path / "batch.conll", rule_sentences(4, seed=2))
    data = TokenTaggingData(train=str(path), backbone=str(tagger_bert), labels=TAGS, val_fraction=0)
    data.setup("fit")
    return next(iter(data.eval_loader(data.split_dataset("train"))))


# --- metrics ------------------------------------------------------------------------------------------------


GOLD = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "I-LOC", "O", "B-PER"]]
GUESSED = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC", "O", "O", "B-LOC"]]


def token_logits(gold: list[list[str]], guessed: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of sentences whose words are two sub-tokens each, after [CLS]: only each word's
    first sub-token is labelled; every other position predicts I-PER, which must not count."""
    width = 2 + 2 * max(len(words) for words in gold)
    labels = torch.full((len(gold), width), IGNORE)
    logits = torch.zeros(len(gold), width, len(TAGS))
    logits[..., TAGS.index("I-PER")] = 5.0
    for row, (gold_tags, guessed_tags) in enumerate(zip(gold, guessed)):
        for word, (truth, guess) in enumerate(zip(gold_tags, guessed_tags)):
            labels[row, 1 + 2 * word] = TAGS.index(truth)
            logits[row, 1 + 2 * word, TAGS.index(guess)] = 10.0
    return logits, labels


def test_entity_scores_are_seqevals_on_each_words_first_sub_token():
    from seqeval.metrics import classification_report, f1_score

    logits, labels = token_logits(GOLD, GUESSED)
    scores = EntityScores(TAGS)
    scores.update(logits[:1], labels[:1])  # two batches of one epoch
    scores.update(logits[1:], labels[1:])
    result = {name: float(value) for name, value in scores.compute().items()}
    # Gold entities: PER 0-1, LOC 3 | LOC 1-2, PER 4. Guessed: PER 0-1 (right), LOC 1 and LOC 4 (wrong).
    assert result["precision"] == pytest.approx(1 / 3)
    assert result["recall"] == pytest.approx(1 / 4)
    assert result["f1"] == pytest.approx(2 / 7)
    assert result["acc"] == pytest.approx(6 / 9)
    micro = classification_report(GOLD, GUESSED, output_dict=True)["micro avg"]
    assert (result["precision"], result["recall"]) == pytest.approx((micro["precision"], micro["recall"]))
    assert result["f1"] == pytest.approx(f1_score(GOLD, GUESSED)) == pytest.approx(micro["f1-score"])


def test_entity_scores_of_two_processes_merge_into_the_whole_epochs():
    logits, labels = token_logits(GOLD, GUESSED)
    whole, first, second = EntityScores(TAGS), EntityScores(TAGS), EntityScores(TAGS)
    whole.update(logits, labels)
    first.update(logits[:1], labels[:1])
    second.update(logits[1:], labels[1:])
    first.merge_state(second)  # what the "cat" reduction does across processes
    merged = {name: float(value) for name, value in first.compute().items()}
    assert merged == pytest.approx({name: float(value) for name, value in whole.compute().items()})
    assert merged["f1"] == pytest.approx(2 / 7)


def test_word_predictions_take_each_words_first_sub_token():
    predicted = torch.tensor([[0, 3, 9, 4, 2, 0], [0, 1, 0, 0, 0, 0]])
    word_ids = torch.tensor([[-1, 0, 0, 1, 2, -1, -1, -1], [-1, 0, -1, -1, -1, -1, -1, -1]])
    values = word_predictions(predicted, word_ids)
    assert values.tolist() == [[3, 4, 2, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1, -1]]


# --- training -----------------------------------------------------------------------------------------------


def test_a_tiny_tagger_learns_a_tagging_rule(tagger_bert, rule_files, tmp_path):
    train, val = rule_files
    pl.seed_everything(0)
    data = TokenTaggingData(train=str(train), val=str(val), backbone=str(tagger_bert), batch_size=16)
    task = TokenClassificationTask(str(tagger_bert), optimizer=OptimizerConfig(lr=5e-3))
    trainer = quiet_trainer(tmp_path, max_epochs=4, num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=data, verbose=False)[0]
    trainer.fit(task, datamodule=data)
    after = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert task.labels == ["O", "B-LOC", "B-PER", "I-LOC"]  # the rule makes no I-PER
    assert before["val/f1"] < 0.5
    assert after["val/f1"] > 0.9 and after["val/acc"] > 0.9
    assert after["val/loss"] < before["val/loss"]


def one_step(task: TokenClassificationTask, batch) -> tuple[set[str], set[str]]:
    """One SGD step on the task loss; (changed, trainable) parameter names."""
    task.configure_model()
    task.train()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    task.task_loss(task(batch), batch["labels"]).backward()
    optimizer.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    return changed, {n for n, p in task.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("full", ("model.",)),
        ("freeze", ("model.classifier.",)),
        (Partial(last_blocks=1), ("model.bert.encoder.layer.1.", "model.classifier.")),
    ],
    ids=["full", "freeze", "partial"],
)
def test_strategies_train_exactly_their_parameters(tagger_bert, tmp_path, strategy, expected):
    task = TokenClassificationTask(str(tagger_bert), strategy=strategy, labels=TAGS)
    changed, trainable = one_step(task, rule_batch(tagger_bert, tmp_path))
    names = {n for n, _ in task.named_parameters()}
    wanted = {n for n in names if n.startswith(expected)}
    assert trainable == wanted
    assert changed == wanted, f"unchanged trainable: {wanted - changed}; changed frozen: {changed - wanted}"


@pytest.mark.parametrize(
    "strategy", [LoRA(rank=2), QLoRA(rank=2, compute_dtype="float32")], ids=["lora", "qlora"]
)
def test_adapter_strategies_train_adapters_and_the_new_head(tagger_bert, tmp_path, strategy):
    task = TokenClassificationTask(str(tagger_bert), strategy=strategy, labels=TAGS)
    changed, trainable = one_step(task, rule_batch(tagger_bert, tmp_path))
    adapters = set(adapter_parameter_names(task))
    head = {n for n, _ in task.named_parameters() if n.startswith("model.classifier.")}
    assert adapters and head and trainable == adapters | head
    assert not changed - trainable, f"frozen parameters changed: {changed - trainable}"
    # LoRA's B starts at zero, so A gets no gradient in the first step.
    assert {n for n in trainable if "lora_A" not in n} <= changed
    assert type(task.model.classifier) is torch.nn.Linear  # the head is neither adapted nor quantised
    if isinstance(strategy, QLoRA):
        import bitsandbytes as bnb

        query = task.model.bert.encoder.layer[0].attention.self.query.base_layer
        assert isinstance(query, bnb.nn.Linear4bit)


def test_a_timm_backbone_is_refused(tiny_timm_checkpoint):
    task = TokenClassificationTask(
        {"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}, labels=TAGS
    )
    with pytest.raises(RecipeError, match=r"^model\.backbone: .*token classification needs a Hugging Face"):
        task.configure_model()


# --- distillation ---------------------------------------------------------------------------------------------


def by_hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T² · Σ p_teacher (log p_teacher - log p_student) per position, written out with exp/log."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(-1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(-1, keepdim=True)
    return t**2 * (p_t * (p_t.log() - p_s.log())).sum(-1)


def test_token_distillation_is_the_formula_over_labelled_tokens(tagger_bert, tmp_path):
    batch = rule_batch(tagger_bert, tmp_path)
    task = TokenClassificationTask(str(tagger_bert), labels=TAGS)
    task.configure_model()
    task.eval()  # no dropout: the forward below gives the step's logits
    torch.manual_seed(0)
    teacher = torch.randn(*batch["input_ids"].shape, len(TAGS)) * 3
    alpha, t = 0.3, 2.0
    task.add_loss_term(LogitKD(lambda: TeacherOutputs(teacher), alpha, t, per_item=task.distillation_loss))
    total = task.training_step(batch, 0)
    with torch.no_grad():
        student = task(batch)
    labelled = batch["labels"] != IGNORE
    log_p = student.log_softmax(-1)
    cross_entropy = -log_p.gather(-1, batch["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)[labelled].mean()
    kd = by_hand_kl(student, teacher, t)[labelled].mean()
    assert labelled.sum() < labelled.numel()  # sub-tokens, specials and padding are left out
    assert torch.allclose(total, alpha * cross_entropy + (1 - alpha) * kd, atol=1e-5)


def test_distillation_from_an_exported_token_classifier(tagger_bert, rule_files, tmp_path):
    teacher_backbone = bert_folder(tmp_path / "teacher-backbone", tagger_bert, hidden=48)
    teacher = TokenClassificationTask(str(teacher_backbone), labels=["O", "B-LOC", "B-PER", "I-LOC"])
    teacher.configure_model()
    exported = teacher.export(tmp_path / "teacher")
    train, val = rule_files
    data = TokenTaggingData(train=str(train), val=str(val), backbone=str(tagger_bert), batch_size=16)
    student = TokenClassificationTask(str(tagger_bert))
    trainer = quiet_trainer(
        tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0
    )
    trainer.callbacks.append(Distillation(teacher=str(exported), alpha=0.5, temperature=2.0))
    trainer.fit(student, datamodule=data)
    assert trainer.callback_metrics["train/kd_loss"] > 0
    assert "val/f1" in trainer.callback_metrics


# --- predictions and export -----------------------------------------------------------------------------------


def test_predictions_are_written_per_word_with_their_entities(tagger_bert, tmp_path):
    words = [["annas", "visiting", "paris"], ["bob", "likes", "berlin", "city", "today"]]
    path = write_conll(tmp_path / "new.conll", [(sentence, rule_tags(sentence)) for sentence in words])
    # [CLS] + 4 tokens + [SEP]: "annas visiting" fill the 4 tokens, so "paris" is cut; so is "today".
    data = TokenTaggingData(predict=str(path), backbone=str(tagger_bert), max_length=6)
    task = TokenClassificationTask(str(tagger_bert), labels=TAGS)
    task.configure_model()
    with torch.no_grad():  # every token predicts B-PER
        task.model.classifier.weight.zero_()
        task.model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]))
    trainer = quiet_trainer(tmp_path, callbacks=[PredictionWriter()])
    trainer.predict(task, datamodule=data, return_predictions=False)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert predictions["tokens"].tolist() == ["annas visiting paris", "bob likes berlin city today"]
    assert predictions["tags"].tolist() == ["B-PER B-PER O", "B-PER B-PER B-PER B-PER O"]
    assert predictions["gold_tags"].tolist() == ["B-PER O B-LOC", "B-PER O B-LOC I-LOC O"]
    entities = json.loads(predictions["entities"][0])
    assert entities == [
        {"type": "PER", "start": 0, "end": 1, "text": "annas"},
        {"type": "PER", "start": 1, "end": 2, "text": "visiting"},
    ]
    assert len(json.loads(predictions["entities"][1])) == 4


EXPORT_CHECK = """
import sys, torch
from transformers import AutoModelForTokenClassification, AutoTokenizer
model = AutoModelForTokenClassification.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
words = [["annas", "visiting", "parisville"], ["bob", "likes", "berlin", "city"]]
inputs = tokenizer(words, is_split_into_words=True, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({"inputs": dict(inputs), "logits": logits, "id2label": model.config.id2label}, sys.argv[2])
assert "finetune" not in sys.modules
"""


def test_export_reloads_with_plain_transformers_and_gives_the_same_logits(tagger_bert, tmp_path):
    task = TokenClassificationTask(str(tagger_bert), labels=TAGS)
    task.configure_model()
    task.eval()
    export = task.export(tmp_path / "export")
    result = tmp_path / "reloaded.pt"
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(export), str(result)], check=True, cwd=tmp_path)
    reloaded = torch.load(result, weights_only=True)
    with torch.no_grad():
        assert torch.allclose(task(reloaded["inputs"]), reloaded["logits"], atol=1e-6)
    assert reloaded["id2label"] == dict(enumerate(TAGS))
    assert json.loads((export / "labels.json").read_text()) == TAGS


def test_lora_exports_adapters_alone_or_merged(tagger_bert, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    batch = rule_batch(tagger_bert, tmp_path)
    task = TokenClassificationTask(str(tagger_bert), strategy=LoRA(rank=2), labels=TAGS)
    one_step(task, batch)
    task.eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    with torch.no_grad():
        expected = task(batch)
        merged = AutoModelForTokenClassification.from_pretrained(task.export(tmp_path / "merged", merge=True))
        assert torch.allclose(merged.eval()(**inputs).logits, expected, atol=1e-5)
        adapters = task.export(tmp_path / "adapters")
        assert (adapters / "adapter_config.json").is_file() and not (adapters / "config.json").exists()
        base = AutoModelForTokenClassification.from_pretrained(tagger_bert, num_labels=len(TAGS))
        reloaded = PeftModel.from_pretrained(base, adapters).eval()
        assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)


# --- the command line -----------------------------------------------------------------------------------------


def test_plan_of_a_tagging_recipe_lists_what_trains(tagger_bert, rule_files, tmp_path, caplog):
    recipe = tagging_recipe(tagger_bert, *rule_files, tmp_path / "runs")
    recipe["model"]["init_args"]["strategy"] = "freeze"
    path = write(recipe, tmp_path / "tagger.yaml")
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert main(["plan", str(path)]) == 0
    text = caplog.text
    for expected in (
        "TokenClassificationTask on",
        "(BertForTokenClassification)",
        "tags: O, B-LOC, B-PER, I-LOC",
        "Parameter groups",
        "never (frozen)",
        "sentences: train 160, val 40",
    ):
        assert expected in text, expected
    # Blocks table: the per-token head (32 wide, over the data's 4 tags) trains from the start, alone.
    assert re.search(rf"^head +{32 * 4 + 4} +0 +start$", text, re.M)
    assert re.search(r"^total +132 +", text, re.M)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_recipe_trains_checkpoints_predicts_and_exports(tagger_bert, rule_files, tmp_path):
    from transformers import AutoModelForTokenClassification

    recipe = write(tagging_recipe(tagger_bert, *rule_files, tmp_path / "runs"), tmp_path / "tagger.yaml")
    assert main([str(recipe)]) == 0
    run = tmp_path / "runs" / "tagger" / "version_0"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["val/f1"].max() > 0.9
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    task = TokenClassificationTask.load_from_checkpoint(best, weights_only=True).eval()
    assert task.labels == ["O", "B-LOC", "B-PER", "I-LOC"]
    exported = AutoModelForTokenClassification.from_pretrained(run / "export").eval()
    batch = rule_batch(tagger_bert, tmp_path)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    with torch.no_grad():
        assert torch.allclose(task(batch), exported(**inputs).logits, atol=1e-6)

    sentences = rule_sentences(6, seed=3)
    unlabelled = write_conll(tmp_path / "new.conll", [(words, None) for words, _ in sentences])
    predict = [
        "predict",
        "--config",
        str(recipe),
        f"--data.init_args.predict={unlabelled}",
        f"--ckpt_path={best}",
    ]
    assert main(predict) == 0
    predictions = pd.read_csv(tmp_path / "runs" / "tagger" / "version_1" / "predictions.csv")
    assert predictions["tokens"].tolist() == [" ".join(words) for words, _ in sentences]
    assert predictions["tags"].tolist() == [" ".join(rule_tags(words)) for words, _ in sentences]
