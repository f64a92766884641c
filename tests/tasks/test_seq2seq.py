"""Seq2SeqTask and Seq2SeqData on a tiny random T5 (and BART) read through the real loaders: the loss covers
target tokens only, strategies train exactly their parameters, accumulation is token-exact, validation
generates and scores with ROUGE, exports reload with plain transformers/peft, and the shipped recipe runs."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from finetune.data.seq2seq import Seq2SeqData
from finetune.errors import RecipeError
from finetune.strategies import LoRA, Partial, adapter_parameter_names
from finetune.strategies.adapters import adapter_targets
from finetune.tasks.seq2seq import Seq2SeqTask
from tests.helpers.seq2seq import save_tiny_bart, save_tiny_t5, summary_rows, write_jsonl

REPOSITORY = Path(__file__).resolve().parents[2]
RECIPE = REPOSITORY / "recipes" / "flan-t5-summarise-lora.yaml"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Targets of 1 to 5 words (the source's first ones): target lengths differ from row to row."""
    rows = summary_rows(16, seed=3)
    for i, row in enumerate(rows):
        row["target"] = " ".join(row["source"].split()[: 1 + i % 5])
    return write_jsonl(rows, tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def data(tiny_t5_dir: Path, train: Path, **kwargs) -> Seq2SeqData:
    return Seq2SeqData(train=str(train), val=str(train), backbone=str(tiny_t5_dir), **kwargs)


def batch_of(data: Seq2SeqData, rows: list[int]) -> dict[str, torch.Tensor]:
    dataset = data.datasets["train"]
    return dataset.collate(dataset.__getitems__(rows))


def one_step(task: Seq2SeqTask, batch) -> tuple[set[str], set[str]]:
    """One SGD step on the task's loss; (changed, trainable) parameter names."""
    task.configure_model()
    task.train()
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.5)
    task.token_losses(batch)[0].backward()
    optimizer.step()
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    return changed, {n for n, p in task.named_parameters() if p.requires_grad}


def test_batches_pad_targets_with_minus_100_and_padding_changes_no_loss(tiny_t5_dir, pairs):
    pairs_data = data(tiny_t5_dir, pairs, source_prefix="summarize: ")
    tokenizer = pairs_data.tokenizer
    batch = batch_of(pairs_data, [0, 4])  # targets of 1 and 5 words
    first, fifth = (json.loads(line) for line in pairs.read_text().splitlines()[0:5:4])
    target_ids = tokenizer(text_target=first["target"])["input_ids"]
    assert target_ids[-1] == tokenizer.eos_token_id and len(target_ids) == 2
    assert batch["labels"][0].tolist() == target_ids + [-100] * 4
    assert batch["labels"][1].tolist() == tokenizer(text_target=fifth["target"])["input_ids"]
    shown = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1])
    assert shown == f"summarize: {first['source']} </s>"

    task = Seq2SeqTask(str(tiny_t5_dir), strategy="full").eval()
    task.configure_model()
    with torch.no_grad():
        together, tokens = task.token_losses(batch)
        alone = [task.token_losses(batch_of(pairs_data, [row])) for row in (0, 4)]
        wider = dict(batch, labels=torch.cat([batch["labels"], torch.full((2, 3), -100)], dim=1))
        widened, wider_tokens = task.token_losses(wider)
    assert tokens == 2 + 6 == sum(n for _, n in alone) == wider_tokens
    torch.testing.assert_close(together, sum(loss for loss, _ in alone))
    torch.testing.assert_close(widened, together)


def test_layout_reads_encoder_then_decoder_blocks_for_partial_and_layer_decay(tiny_t5_dir, tmp_path):
    from finetune.optim import OptimizerConfig
    from finetune.optim.groups import param_groups

    bart = Seq2SeqTask(str(save_tiny_bart(tmp_path / "bart")), strategy="full")
    bart.configure_model()
    assert bart.layout.blocks == tuple(
        (f"model.{stack}.layers.{i}",) for stack in ("encoder", "decoder") for i in (0, 1)
    )
    task = Seq2SeqTask(str(tiny_t5_dir), strategy=Partial(last_blocks=1))
    task.configure_model()
    blocks = tuple((f"{stack}.block.{i}",) for stack in ("encoder", "decoder") for i in (0, 1))
    assert task.layout.blocks == blocks and task.layout.head == ("lm_head",)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    names = {n for n, _ in task.model.named_parameters()}
    # transformers ties T5's head to the shared embedding: the trained head is that one tensor.
    assert task.model.lm_head.weight is task.model.shared.weight
    top = ("decoder.block.1.", "decoder.final_layer_norm.", "shared.weight")
    assert trainable == {n for n in names if n.startswith(top)}

    full = Seq2SeqTask(str(tiny_t5_dir), strategy="full")
    full.configure_model()
    groups = param_groups(full.model, full.layout, OptimizerConfig(lr=1.0, layer_decay=0.5))
    lr = {name: group["lr"] for group in groups for name in group["names"]}
    assert lr["shared.weight"] == 0.5**5 and lr["decoder.final_layer_norm.weight"] == 1.0
    assert [lr[f"{b[0]}.layer.0.SelfAttention.q.weight"] for b in blocks] == [0.5**4, 0.5**3, 0.5**2, 0.5]


def test_lora_on_q_and_v_trains_the_adapters_alone(tiny_t5_dir, pairs):
    task = Seq2SeqTask(str(tiny_t5_dir), strategy=LoRA(rank=2, target_modules=["q", "v"]))
    changed, trainable = one_step(task, batch_of(data(tiny_t5_dir, pairs), [0, 1, 2]))
    targets = adapter_targets(task.model)
    # Encoder self-attention, decoder self- and cross-attention, in each of the 2 blocks: q and v.
    assert len(targets) == 12 and {t.rpartition(".")[2] for t in targets} == {"q", "v"}
    assert {t.split(".")[-2] for t in targets} == {"SelfAttention", "EncDecAttention"}
    adapters = set(adapter_parameter_names(task))
    assert trainable == adapters
    assert not changed - adapters, f"frozen parameters changed: {changed - adapters}"
    assert {n for n in adapters if "lora_B" in n} <= changed  # B starts at 0: A gets no gradient yet


def test_all_linear_leaves_lm_head_out_and_full_trains_everything(tiny_t5_dir, pairs):
    batch = batch_of(data(tiny_t5_dir, pairs), [0, 1, 2])
    task = Seq2SeqTask(str(tiny_t5_dir), strategy=LoRA(rank=2, target_modules="all-linear"))
    task.configure_model()
    targets = adapter_targets(task.model)
    # Per block: q, k, v, o and wi_0, wi_1, wo; a decoder block adds cross-attention's q, k, v, o.
    assert len(targets) == 2 * 7 + 2 * 11 and not any("lm_head" in t for t in targets)
    full = Seq2SeqTask(str(tiny_t5_dir), strategy="full")
    changed, trainable = one_step(full, batch)
    assert changed == trainable == {n for n, _ in full.named_parameters()}


def test_qlora_quantises_the_t5_base_and_trains_the_adapters_alone(tmp_path, pairs):
    import bitsandbytes as bnb

    from finetune.strategies import QLoRA

    t5_64 = save_tiny_t5(tmp_path / "t5", width=64)  # bitsandbytes quantises blocks of 64 values
    strategy = QLoRA(compute_dtype="float32", rank=2, target_modules=["q", "v"])
    task = Seq2SeqTask(str(t5_64), strategy=strategy)
    changed, trainable = one_step(task, batch_of(data(t5_64, pairs), [0, 1]))
    attention = task.model.decoder.block[1].layer[1].EncDecAttention
    assert isinstance(attention.q.base_layer, bnb.nn.Linear4bit) and isinstance(
        attention.k, bnb.nn.Linear4bit
    )
    adapters = set(adapter_parameter_names(task))
    assert trainable == adapters and not changed - adapters


class Grads(pl.Callback):
    """The gradients of the (single) optimizer step as the optimizer saw them."""

    def on_train_end(self, trainer, pl_module):
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_batch_1_times_accumulation_4_equals_batch_4(tiny_t5_dir, pairs):
    dataset = data(tiny_t5_dir, pairs).datasets["train"]
    assert len({len(dataset[i]["labels"]) for i in range(4)}) == 4  # 4 different target lengths

    def grads(batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collate)
        probe = Grads()
        trainer = pl.Trainer(
            max_steps=1,
            accumulate_grad_batches=accumulate,
            callbacks=[probe],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Seq2SeqTask(str(tiny_t5_dir), strategy="full"), loader)
        return probe.grads

    big, small = grads(4, 1), grads(1, 4)
    assert big.keys() == small.keys() and len(big) > 10
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def rouge_by_hand(generation: str, reference: str) -> tuple[float, float, float]:
    """ROUGE-1, -2 and -L F-measures of one pair, on lower-cased alphanumeric words."""

    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()

    def f1(hits: int, predicted: int, wanted: int) -> float:
        return 0.0 if hits == 0 else 2 * hits / (predicted + wanted)

    ours, theirs = words(generation), words(reference)
    scores = []
    for n in (1, 2):
        a = Counter(zip(*[ours[i:] for i in range(n)]))
        b = Counter(zip(*[theirs[i:] for i in range(n)]))
        scores.append(f1(sum((a & b).values()), sum(a.values()), sum(b.values())))
    lcs = [[0] * (len(theirs) + 1) for _ in range(len(ours) + 1)]
    for i, x in enumerate(ours):
        for j, y in enumerate(theirs):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    scores.append(f1(lcs[-1][-1], len(ours), len(theirs)))
    return tuple(scores)


@pytest.mark.slow
def test_each_epochs_rouge_is_that_of_its_samples_and_a_tiny_t5_learns_the_rule(tiny_t5_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    train = write_jsonl(summary_rows(256, seed=1), tmp_path / "train.jsonl")
    val = write_jsonl(summary_rows(24, seed=2), tmp_path / "val.jsonl")
    task = Seq2SeqTask(
        str(tiny_t5_dir), strategy="full", generate_rows=None, max_new_tokens=6, optimizer={"lr": 1e-2}
    )
    summaries = Seq2SeqData(
        train=str(train), val=str(val), source_prefix="summarize: ", batch_size=16, backbone=str(tiny_t5_dir)
    )
    trainer = pl.Trainer(
        max_epochs=4,
        logger=CSVLogger(tmp_path, name="run", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task, summaries)

    run = tmp_path / "run" / "version_0"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["epoch"] for s in samples] == [
        e for e in range(4) for _ in range(24)
    ]  # none from the sanity check
    assert samples[0]["source"] == "summarize: " + summary_rows(24, seed=2)[0]["source"]
    logged = [row for row in csv.DictReader((run / "metrics.csv").open()) if row.get("val/rouge1")]
    assert len(logged) == 4
    for epoch, row in enumerate(logged):
        rows = [s for s in samples if s["epoch"] == epoch]
        by_hand = [
            sum(scores) / len(rows)
            for scores in zip(*(rouge_by_hand(s["generation"], s["reference"]) for s in rows))
        ]
        assert [float(row[f"val/{key}"]) for key in ("rouge1", "rouge2", "rougeL")] == pytest.approx(
            by_hand, abs=1e-5
        )
    # A constant "colour animal verb" guess scores about 1/3; here the rule is learned (1.0 from epoch 2).
    assert float(logged[-1]["val/rougeL"]) > 0.9
    assert float(logged[-1]["val/loss"]) < float(logged[0]["val/loss"])


def trained(task: Seq2SeqTask) -> Seq2SeqTask:
    """Configure the model and move every trained weight off its initial value (LoRA's B starts at zero)."""
    task.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for _, parameter in task.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return task.eval()


def test_adapter_and_merged_exports_reload_with_plain_transformers_and_peft(tiny_t5_dir, pairs, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    task = trained(Seq2SeqTask(str(tiny_t5_dir), strategy=LoRA(rank=2, target_modules=["q", "v"])))
    batch = batch_of(data(tiny_t5_dir, pairs), [0, 1, 4])
    with torch.no_grad():
        expected = task(batch)
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": task.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    }

    adapter = task.export(tmp_path / "adapter")
    assert not (adapter / "model.safetensors").exists()
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base, adapter).eval()(**inputs).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)

    merged = task.export(tmp_path / "merged", merge=True)
    assert not any("lora" in key for key in load_file(merged / "model.safetensors"))
    plain = AutoModelForSeq2SeqLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.decode(tokenizer("red cat")["input_ids"]) == "red cat </s>"


@pytest.mark.slow
def test_shipped_recipe_end_to_end_through_the_cli_with_a_tiny_t5(tiny_t5_dir, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from finetune.cli import main

    code = main(
        [
            str(RECIPE),
            f"--model.init_args.backbone={tiny_t5_dir}",
            f"--data.init_args.train={REPOSITORY / 'recipes' / 'data' / 'summaries.jsonl'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    run = tmp_path / RECIPE.stem / "version_0"
    assert json.loads((run / "export" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(s["source"].startswith("summarize: ") for s in samples)  # 20% of 60
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state)
    metrics = next(csv.DictReader((run / "metrics.csv").open()))
    assert {"val/loss", "val/rouge1", "val/rouge2", "val/rougeL"} <= set(metrics)

    assert main(["export", str(run), "--merge"]) == 0
    merged = run / "export-merged"
    model = AutoModelForSeq2SeqLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer("summarize: red cat sits fast", return_tensors="pt")
    assert model.generate(**prompt, max_new_tokens=3, do_sample=False).shape[1] > 1


def test_bad_inputs_name_their_recipe_key(tiny_t5_dir, pairs, tiny_bert_dir, tmp_path):
    with pytest.raises(RecipeError, match="^data.target_column: column 'summary' not in pairs.jsonl"):
        data(tiny_t5_dir, pairs, target_column="summary").datasets  # noqa: B018
    with pytest.raises(RecipeError, match="^data.target_column: 'source' is also the source column"):
        data(tiny_t5_dir, pairs, target_column="source")
    with pytest.raises(RecipeError, match="^data.max_target_length: must be 2 or more"):
        data(tiny_t5_dir, pairs, max_target_length=1)
    holes = tmp_path / "holes.csv"
    holes.write_text("source,target\nred cat,red\nblue dog,\n")
    with pytest.raises(RecipeError, match="^data.train: 1 rows of holes.csv have no 'target'"):
        data(tiny_t5_dir, holes).datasets  # noqa: B018
    with pytest.raises(RecipeError, match="^model.generate_rows: must be 0 or more"):
        Seq2SeqTask(str(tiny_t5_dir), generate_rows=-1)
    with pytest.raises(
        RecipeError,
        match="^model.backbone: .* is a bert model; transformers has no encoder-decoder language model",
    ):
        Seq2SeqTask(str(tiny_bert_dir)).configure_model()
    with pytest.raises(RecipeError, match="^model.backbone: timm models are not encoder-decoder"):
        Seq2SeqTask("timm:test_vit").configure_model()
