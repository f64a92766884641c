"""Preference tuning: the losses against their formulas, log-prob gathering, the pair data, the reference model
(adapters disabled under lora, a frozen copy under full, precomputed), what one step trains, gradient
accumulation, learning a rule, and the shipped recipes end to end (one started from an SFT run folder)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from finetune.cli import main
from finetune.data.conversations import IGNORE
from finetune.errors import RecipeError
from finetune.tasks.preference import PreferenceTask, sequence_logps
from finetune.tasks.preference_losses import dpo, ipo, orpo, simpo
from tests.helpers.preferences import FILLER, pair_data, rule_pairs, write_jsonl
from tests.helpers.recipes import write

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# Per-sequence log-probs of three pairs, and a reference's.
CHOSEN = torch.tensor([-5.0, -7.0, -0.3], dtype=torch.float64)
REJECTED = torch.tensor([-6.0, -4.0, -0.9], dtype=torch.float64)
REF_CHOSEN = torch.tensor([-5.5, -6.0, -0.4], dtype=torch.float64)
REF_REJECTED = torch.tensor([-5.0, -4.5, -0.8], dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def by_hand(formula) -> torch.Tensor:
    rows = zip(CHOSEN.tolist(), REJECTED.tolist(), REF_CHOSEN.tolist(), REF_REJECTED.tolist())
    return torch.tensor([formula(*row) for row in rows], dtype=torch.float64)


def test_dpo_and_ipo_equal_their_formulas():
    beta, eps = 0.3, 0.1

    def cdpo(c, r, rc, rr):
        h = (c - rc) - (r - rr)
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)

    out = dpo(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(out.loss, by_hand(cdpo))
    torch.testing.assert_close(out.chosen_rewards, beta * (CHOSEN - REF_CHOSEN))
    torch.testing.assert_close(out.rejected_rewards, beta * (REJECTED - REF_REJECTED))
    # A likelier chosen response lowers the loss, a likelier rejected one raises it; no margin: log 2.
    plain = dpo(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta).loss
    assert (dpo(CHOSEN + 0.5, REJECTED, REF_CHOSEN, REF_REJECTED, beta=beta).loss < plain).all()
    assert (dpo(CHOSEN, REJECTED + 0.5, REF_CHOSEN, REF_REJECTED, beta=beta).loss > plain).all()
    torch.testing.assert_close(
        dpo(CHOSEN, REJECTED, CHOSEN, REJECTED).loss, torch.full((3,), math.log(2), dtype=torch.float64)
    )

    tau = 0.25
    out = ipo(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, beta=tau)
    torch.testing.assert_close(
        out.loss, by_hand(lambda c, r, rc, rr: ((c - rc) - (r - rr) - 1 / (2 * tau)) ** 2)
    )
    torch.testing.assert_close(out.chosen_rewards, tau * (CHOSEN - REF_CHOSEN))


def test_simpo_and_orpo_equal_their_formulas():
    beta, gamma, eps = 2.0, 0.7, 0.05

    def simpo_by_hand(c, r, *_):
        x = beta * (c - r) - gamma
        return -(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)

    out = simpo(CHOSEN, REJECTED, beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(out.loss, by_hand(simpo_by_hand))
    torch.testing.assert_close(out.chosen_rewards, beta * CHOSEN)
    # The margin gamma is demanded: equal log-probs still cost more than log 2.
    assert (simpo(CHOSEN, CHOSEN, beta=beta, gamma=gamma).loss > math.log(2)).all()

    lam = 0.2

    def orpo_by_hand(c, r, *_):
        odds = lambda logp: math.log(math.exp(logp) / (1 - math.exp(logp)))  # noqa: E731
        return -c - lam * log_sigmoid(odds(c) - odds(r))

    out = orpo(CHOSEN, REJECTED, beta=lam)
    torch.testing.assert_close(out.loss, by_hand(orpo_by_hand))
    torch.testing.assert_close(out.rejected_rewards, lam * REJECTED)
    assert (orpo(CHOSEN + 0.1, REJECTED, beta=lam).loss < out.loss).all()


def test_sequence_logps_count_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 7, 2, IGNORE], [IGNORE, 3, 3, IGNORE, IGNORE, IGNORE]])
    sums, counts = sequence_logps(logits, labels)
    log_probs = logits.log_softmax(-1)
    expected = [
        sum(log_probs[row, t - 1, labels[row, t]].item() for t in range(6) if labels[row, t] != IGNORE)
        for row in range(2)
    ]
    torch.testing.assert_close(sums, torch.tensor(expected))
    assert counts.tolist() == [3, 2]
    # Logits at positions that predict a prompt or padding token change nothing.
    changed = logits.clone()
    changed[0, [0, 4, 5]] += 5.0
    changed[1, [2, 3, 4, 5]] -= 3.0
    torch.testing.assert_close(sequence_logps(changed, labels)[0], sums)


def test_pairs_batch_chosen_then_rejected_with_the_prompt_masked(tiny_llama_dir, tmp_path):
    rows = [
        {"prompt": "say hello", "chosen": "hello world", "rejected": "bad"},
        {"prompt": "count", "chosen": "one two three", "rejected": "one"},
    ]
    data = pair_data(tiny_llama_dir, write_jsonl(tmp_path / "p.jsonl", rows), batch_size=2)
    tok = data.tokenizer
    batch = data.datasets["train"].collate(data.datasets["train"].__getitems__([0, 1]))
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [0, 1]
    texts = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        words = tok.convert_ids_to_tokens(ids[mask.bool()].tolist())
        start = words.index("Response:") + 1
        assert (labels[:start] == IGNORE).all() and (labels[mask == 0] == IGNORE).all()
        assert labels[start : len(words)].tolist() == ids[start : len(words)].tolist()
        texts.append(" ".join(words[start:]))
    assert texts == ["hello world </s>", "one two three </s>", "bad </s>", "one </s>"]
    # Chosen and rejected share each prompt.
    for pair in range(2):
        chosen, rejected = batch["input_ids"][pair], batch["input_ids"][pair + 2]
        prompt = int((batch["labels"][pair] == IGNORE).long().argmin())
        assert torch.equal(chosen[:prompt], rejected[:prompt])


def test_pair_formats_tokenise_alike_and_truncation_keeps_the_boundary(tiny_llama_dir, tmp_path):
    user = [{"role": "user", "content": "say hello"}]
    formats = [
        {"prompt": "say hello", "chosen": "hello", "rejected": "world"},
        {
            "chosen": [*user, {"role": "assistant", "content": "hello"}],
            "rejected": [*user, {"role": "assistant", "content": "world"}],
        },
        {"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "world"},
    ]
    data = pair_data(tiny_llama_dir, write_jsonl(tmp_path / "formats.jsonl", formats))
    tokens = data.datasets["train"].tokens
    assert tokens[0] == tokens[1] == tokens[2]

    long = [{"prompt": "say one two three hello world", "chosen": "good great fine okay", "rejected": "bad"}]
    data = pair_data(
        tiny_llama_dir, write_jsonl(tmp_path / "long.jsonl", long), max_length=9, max_prompt_length=5
    )
    row = data.datasets["train"].tokens[0]
    words = data.tokenizer.convert_ids_to_tokens(row["chosen_input_ids"])
    # BOS and the prompt's last 4 tokens, then the response cut to the 4 tokens left (its EOS is lost).
    prompt = ["<s>", "hello", "world", "###", "Response:"]
    assert words == [*prompt, "good", "great", "fine", "okay"]
    assert row["chosen_labels"][:5] == [IGNORE] * 5 and IGNORE not in row["chosen_labels"][5:]
    assert data.tokenizer.convert_ids_to_tokens(row["rejected_input_ids"]) == [*prompt, "bad", "</s>"]


def test_chat_template_trains_on_the_final_reply_only(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "chat-llama")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}### {{ m['role'] }} {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}### assistant {% endif %}"
    )
    tok.save_pretrained(model_dir)
    history = [
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "count"},
    ]
    rows = [
        {"prompt": history, "chosen": "one two", "rejected": "bad"},
        {"prompt": "count", "chosen": "one", "rejected": "one"},  # equal responses are allowed
    ]
    data = pair_data(model_dir, write_jsonl(tmp_path / "chat.jsonl", rows))
    row = data.datasets["train"].tokens[0]
    for side, reply in (("chosen", ["one", "two", "</s>"]), ("rejected", ["bad", "</s>"])):
        words = tok.convert_ids_to_tokens(row[f"{side}_input_ids"])
        trained = [w for w, label in zip(words, row[f"{side}_labels"]) if label != IGNORE]
        assert trained == reply, side  # the earlier assistant turn "hello" is prompt
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        assert row[f"{side}_input_ids"][: -len(reply)] == tok(prompt, add_special_tokens=False)["input_ids"]
    second = data.datasets["train"].tokens[1]
    assert second["chosen_input_ids"] == second["rejected_input_ids"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "say", "chosen": "good"}, "needs 'chosen' and 'rejected'"),
        ({"prompt": "say", "chosen": "  ", "rejected": "bad"}, "'chosen' has an empty response"),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
            },
            "has an empty prompt",
        ),
        (
            {"prompt": "say", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
            "must start and end",
        ),
        ({"prompt": "say", "chosen": [{"content": "x"}], "rejected": "y"}, "list of {'role', 'content'}"),
    ],
)
def test_bad_pairs_name_the_key(tiny_llama_dir, tmp_path, row, message):
    ok = {"prompt": "say", "chosen": "good", "rejected": "bad"}
    data = pair_data(tiny_llama_dir, write_jsonl(tmp_path / "bad.jsonl", [ok, row]))
    with pytest.raises(RecipeError, match=message) as error:
        data.prepare_data()
    assert error.value.key == "data.train" and "bad.jsonl line 2" in str(error.value)


def test_bad_settings_name_their_keys(tiny_llama_dir, tmp_path):
    with pytest.raises(RecipeError, match="data.max_prompt_length"):
        pair_data(tiny_llama_dir, tmp_path / "x.jsonl", max_length=8, max_prompt_length=8)
    backbone = str(tiny_llama_dir)
    cases = [
        ({"loss": "kto"}, "model.loss"),
        ({"loss": "orpo", "gamma": 1.0}, "model.gamma"),
        ({"loss": "ipo", "label_smoothing": 0.1}, "model.label_smoothing"),
        ({"beta": 0.0}, "model.beta"),
        ({"reference_dtype": "bfloat16"}, "model.reference_dtype"),  # lora: no copy to cast
        ({"loss": "simpo", "precompute_reference": True}, "model.precompute_reference"),
    ]
    for arguments, key in cases:
        with pytest.raises(RecipeError) as error:
            PreferenceTask(backbone, **arguments)
        assert error.value.key == key


def trainer(root: Path, **options) -> pl.Trainer:
    settings = dict(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**settings | options)


def base_logps(model_dir: Path, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The untouched model's summed log-probs of the batch's chosen and rejected responses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])[0].chunk(2)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rule_pairs(16, seed=0))


def test_lora_reference_is_the_base_model_and_only_adapters_train(tiny_llama_dir, pairs_file, tmp_path):
    data = pair_data(tiny_llama_dir, pairs_file)
    task = PreferenceTask(str(tiny_llama_dir), strategy="lora", optimizer={"name": "sgd", "lr": 1.0})
    task.configure_model()
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    batch = data.datasets["train"].collate(data.datasets["train"].__getitems__([0, 1, 2]))
    expected = base_logps(tiny_llama_dir, batch)
    for got, want in zip(task.reference_logps(batch), expected):
        torch.testing.assert_close(got, want)

    trainer(tmp_path).fit(task, datamodule=data)  # two SGD steps (lora_B moves first, then lora_A)

    changed = {name for name, p in task.named_parameters() if not torch.equal(p, before[name])}
    assert trainable == {name for name in before if "lora_" in name} == changed
    assert {name for name, p in task.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        policy = task.pair_logps(task(batch), batch["labels"])
    assert not torch.allclose(policy[0], expected[0])  # the adapters act on the policy ...
    for got, want in zip(task.reference_logps(batch), expected):  # ... and disabling them restores the base
        torch.testing.assert_close(got, want)
    assert {name for name, p in task.named_parameters() if p.requires_grad} == trainable


class HeldReference(pl.Callback):
    """Records, while the trainer runs, the reference copy and the optimizer's parameters."""

    def on_train_end(self, trainer, task):
        self.reference = task.reference
        self.precomputed = task.precomputed
        self.optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.memory = task.memory_rows()


def test_full_reference_is_frozen_outside_optimizer_and_checkpoint(tiny_llama_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    data = pair_data(tiny_llama_dir, pairs_file)
    task = PreferenceTask(
        str(tiny_llama_dir), strategy="full", reference_dtype="bfloat16", optimizer={"name": "sgd", "lr": 0.5}
    )
    held = HeldReference()
    trainer(tmp_path, callbacks=[held]).fit(task, datamodule=data)

    start = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    reference = held.reference.model.state_dict()
    assert all(torch.equal(reference[name], start[name].to(torch.bfloat16)) for name in start)
    assert not any(id(p) in held.optimized for p in held.reference.model.parameters())
    assert any(not torch.equal(p, start[n]) for n, p in task.model.named_parameters())  # the policy trained
    model_keys = {f"model.{name}" for name in task.model.state_dict()}
    assert set(task.state_dict()) == model_keys  # nothing of the reference in checkpoints
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in task.model.parameters())
    size = sum(t.numel() * 2 for t in [*held.reference.model.parameters(), *held.reference.model.buffers()])
    assert held.memory == [("reference model (frozen, on every device)", size)]
    assert task.reference is held.reference  # kept for validating after fit


def test_precomputed_reference_is_the_starting_model_and_the_copy_is_dropped(
    tiny_llama_dir, pairs_file, tmp_path
):
    data = pair_data(tiny_llama_dir, pairs_file, val_fraction=0.25)
    task = PreferenceTask(str(tiny_llama_dir), strategy="full", precompute_reference=True)
    held = HeldReference()
    trainer(tmp_path, callbacks=[held], max_steps=1).fit(task, datamodule=data)
    assert held.reference is None
    assert held.memory == [("reference model (until its log-probs are precomputed)", held.memory[0][1])]
    for split, dataset in data.datasets.items():
        batch = dataset.collate(dataset.__getitems__(list(range(len(dataset)))))
        expected = torch.stack(base_logps(tiny_llama_dir, batch), dim=-1)
        torch.testing.assert_close(held.precomputed[split], expected)


def test_accumulating_8_single_pairs_equals_one_batch_of_8(tiny_llama_dir, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM

    weights = []
    for batch_size, accumulate in ((8, 1), (1, 8)):
        pl.seed_everything(0)
        data = pair_data(tiny_llama_dir, pairs_file, batch_size=batch_size, limit=8)
        task = PreferenceTask(str(tiny_llama_dir), strategy="full", optimizer={"name": "sgd", "lr": 1.0})
        trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate).fit(task, datamodule=data)
        weights.append(dict(task.model.named_parameters()))
    start = dict(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).named_parameters())
    assert any(not torch.allclose(p, start[name]) for name, p in weights[0].items())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_dpo_learns_a_rule_that_held_out_pairs_follow(tiny_llama_dir, tmp_path):
    # Held-out pairs put the rule's words between fillers that no training pair has.
    train = write_jsonl(tmp_path / "train.jsonl", rule_pairs(160, seed=1, fillers=FILLER[:4]))
    val = write_jsonl(tmp_path / "val.jsonl", rule_pairs(40, seed=2, fillers=FILLER[4:]))
    data = pair_data(tiny_llama_dir, train, val=str(val), batch_size=8)
    task = PreferenceTask(str(tiny_llama_dir), samples=0, optimizer={"name": "adamw", "lr": 5e-3})
    run = trainer(tmp_path, max_steps=-1, max_epochs=3, limit_val_batches=None, check_val_every_n_epoch=3)
    run.validate(task, datamodule=data, verbose=False)
    assert run.callback_metrics["val/rewards/accuracy"] == 0  # the policy is the reference: no margin yet
    run.fit(task, datamodule=data)
    assert run.callback_metrics["val/rewards/accuracy"] > 0.8
    assert run.callback_metrics["val/rewards/margin"] > 0


def cli(recipe: Path, backbone: Path, root: Path, *extra: str) -> Path:
    """Run a recipe through the CLI on the tiny Llama for one short epoch; return its run folder."""
    data = RECIPES / "data" / ("instructions.jsonl" if "sft" in recipe.stem else "preferences.jsonl")
    code = main(
        [
            str(recipe),
            f"--model.init_args.backbone={backbone}",
            f"--data.init_args.train={data}",
            f"--trainer.default_root_dir={root}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )
    assert code == 0
    return root / recipe.stem / "version_0"


@pytest.mark.slow
def test_dpo_recipe_from_an_sft_run_folder_and_its_adapters_export(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.tasks.sft import causal_lm_backbone

    sft = yaml.safe_load((RECIPES / "qlora-sft.yaml").read_text())
    sft["model"]["init_args"]["strategy"] = {
        "class_path": "finetune.strategies.LoRA",
        "init_args": {"rank": 4},
    }
    sft_run = cli(write(sft, tmp_path / "sft.yaml"), tiny_llama_dir, tmp_path)

    run = cli(RECIPES / "dpo-qlora.yaml", sft_run, tmp_path)
    merged = sft_run / "export-merged"  # the SFT adapters merged into the base: what DPO started from
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["backbone"] == str(sft_run)
    adapter = json.loads((run / "export" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(merged)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state)  # no reference model in the checkpoint
    metrics = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/rewards/accuracy", "train/rewards/margin", "train/logps/chosen"} <= set(metrics)
    assert len((run / "samples.jsonl").read_text().splitlines()) == 2
    # The DPO adapters load with plain peft onto the merged SFT model.
    ids = torch.tensor([[2, 16, 17, 18]])
    dpo_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged), run / "export")
    assert dpo_model(input_ids=ids).logits.isfinite().all()

    # The SFT run's adapters export stands for the same model, merged by peft (written afresh here).
    expected = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    shutil.rmtree(merged)
    assert causal_lm_backbone(str(sft_run / "export")).name == str(merged)
    got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_orpo_recipe_end_to_end(tiny_llama_dir, tmp_path):
    run = cli(RECIPES / "orpo-lora.yaml", tiny_llama_dir, tmp_path)
    assert (run / "export" / "adapter_config.json").is_file()
    assert "reference: none (reference-free loss)" in (run / "plan.txt").read_text()
    assert "reference model" not in (run / "plan.txt").read_text()
