"""``trainer.strategy: fsdp2`` on 2 CPU processes (gloo) against one process with the same global batch:
every fine-tuning strategy, gradual unfreezing and token-level loss normalisation give the same losses and
weights, frozen weights stay bitwise still, a sharded checkpoint resumes identically and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.callbacks.export import is_sharded
from finetune.runs import load_checkpoint
from finetune.tasks import ClassificationTask
from tests.helpers.models import make_tokenizer
from tests.helpers.parallel_run import run_case

SCRIPT = Path(__file__).parents[1] / "helpers" / "parallel_run.py"
REPOSITORY = Path(__file__).parents[2]

# name -> (model kind, strategy, gradual unfreezing); every case also runs in one process.
CASES = {
    "hf-full": ("hf", "full", False),
    "hf-partial": ("hf", {"name": "partial", "last_blocks": 1}, False),
    "hf-lora": ("hf", "lora", False),
    "hf-unfreezing": ("hf", "full", True),
    "timm-full": ("timm", "full", False),
    "timm-partial": ("timm", {"name": "partial", "last_blocks": 1}, False),
    "timm-lora": ("timm", "lora", False),
    "llama-lora-token-loss": ("causal_lm", "lora", False),
}


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory) -> Path:
    """A tiny BERT whose forward is deterministic (no dropout), so process counts can be compared."""
    from transformers import AutoModel, BertConfig

    directory = tmp_path_factory.mktemp("bert-no-dropout")
    tokenizer = make_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    return directory


def case(name: str, root: Path, backbones: dict, **extra) -> dict:
    kind, strategy, unfreeze = CASES[name]
    backbone, vocab = backbones[kind]
    spec = {"kind": kind, "backbone": backbone, "vocab": vocab, "strategy": strategy, "unfreeze": unfreeze}
    return (
        spec | {"devices": 2, "batch": 8, "root": str(root / name), "out": str(root / f"{name}.pt")} | extra
    )


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, bert_without_dropout, tiny_timm_checkpoint, tiny_llama_dir) -> dict:
    """Every case (and a 1-epoch run with a sharded checkpoint, then its resumption) under torchrun."""
    root = tmp_path_factory.mktemp("fsdp2")
    from transformers import AutoTokenizer

    backbones = {
        "hf": (str(bert_without_dropout), len(AutoTokenizer.from_pretrained(bert_without_dropout))),
        "timm": ({"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}, 0),
        "causal_lm": (str(tiny_llama_dir), len(AutoTokenizer.from_pretrained(tiny_llama_dir))),
    }
    cases = [case(name, root, backbones) for name in CASES]
    half = case(
        "hf-full", root, backbones, epochs=1, checkpoints=str(root / "ckpt"), out=str(root / "half.pt")
    )
    resumed = case(
        "hf-full", root, backbones, resume=str(root / "ckpt" / "last.ckpt"), out=str(root / "resumed.pt")
    )
    spec = root / "cases.json"
    spec.write_text(json.dumps([*cases, half, resumed]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            str(spec),
        ],
        cwd=root,
        env=os.environ | {"PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = {c["out"]: torch.load(c["out"], weights_only=True) for c in [*cases, half, resumed]}
    return {
        "root": root,
        "backbones": backbones,
        "cases": cases,
        "results": results,
        "half": half,
        "resumed": resumed,
    }


def changed(result: dict) -> set[str]:
    return {k for k, v in result["final"].items() if not torch.equal(v, result["initial"][k])}


EXPECTED = {  # prefixes of the parameters that train, per strategy
    "full": ("model.",),
    "partial-hf": ("model.bert.encoder.layer.1.", "model.bert.pooler.", "model.classifier."),
    "partial-timm": ("model.blocks.5.", "model.norm.", "model.head."),
    "lora": ("lora_", "model.classifier.", "model.head."),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_sharded_processes_equal_one_process(sharded, name):
    spec = next(c for c in sharded["cases"] if c["out"].endswith(f"/{name}.pt"))
    got = sharded["results"][spec["out"]]
    reference = run_case(spec | {"devices": 1, "root": str(sharded["root"] / f"{name}-1")})
    # The losses of the two halves of each global batch average to the one-process loss (token-level
    # normalisation: the two ranks' token counts are all-reduced, and the logged loss is per micro-batch).
    if CASES[name][0] != "causal_lm":
        assert torch.allclose(got["losses"].mean(0), reference["losses"][0], rtol=1e-4, atol=1e-6)
    # Each parameter's update (final - initial) in 2 processes equals the 1-process update to within 1% of
    # its largest element: sums in another order round differently, and Adam's normalisation turns that
    # rounding into visible (but tiny) differences on elements whose gradient is nearly zero.
    for key, value in reference["final"].items():
        update = (value - reference["initial"][key]).abs().max()
        assert (got["final"][key] - value).abs().max() <= 0.01 * update + 1e-6, key
    moved = changed(got)
    assert moved == changed(reference)
    strategy = CASES[name][1] if isinstance(CASES[name][1], str) else f"partial-{CASES[name][0]}"
    if CASES[name][0] == "causal_lm":
        assert moved and all("lora_" in key for key in moved)
    else:
        prefixes = EXPECTED[strategy]
        assert moved == {
            k for k in got["final"] if any(p in k if p == "lora_" else k.startswith(p) for p in prefixes)
        }
    for key in set(got["final"]) - moved:  # frozen: bitwise what it was
        assert torch.equal(got["final"][key], got["initial"][key])


def test_token_counts_differ_between_the_ranks_halves():
    """What makes the token-level case above a real check: in each global batch the two ranks' halves hold
    different numbers of target tokens, so a mean of the two per-rank means would not equal the token mean."""
    from tests.helpers.parallel_run import rows

    spec = {"kind": "causal_lm", "vocab": 27}
    counts = [int((r["labels"][1:] != -100).sum()) for r in rows(spec)]
    for start in (0, 8):
        halves = [sum(counts[start + rank : start + 8 : 2]) for rank in (0, 1)]
        assert halves[0] != halves[1]


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint_continues_identically(sharded):
    uninterrupted = sharded["results"][
        next(c["out"] for c in sharded["cases"] if c["out"].endswith("/hf-full.pt"))
    ]
    resumed = sharded["results"][sharded["resumed"]["out"]]
    checkpoint = Path(sharded["half"]["checkpoints"]) / "last.ckpt"
    assert checkpoint.is_dir() and list(checkpoint.glob("*.distcp"))  # one shard file per process
    for key, value in uninterrupted["final"].items():
        assert torch.allclose(resumed["final"][key], value, rtol=0, atol=1e-6), key


@pytest.mark.slow
def test_sharded_checkpoint_consolidates_and_exports_for_plain_transformers(sharded, tmp_path):
    from transformers import AutoModelForSequenceClassification

    half = sharded["results"][sharded["half"]["out"]]
    task = load_checkpoint(Path(sharded["half"]["checkpoints"]) / "last.ckpt", ClassificationTask)
    assert not is_sharded(task)
    for key, value in task.state_dict().items():  # the consolidated weights are the trained ones
        assert torch.equal(value, half["final"][key]), key
    export = task.export(tmp_path / "export")
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    task.eval()
    ids = torch.randint(5, 17, (3, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, task(batch), atol=1e-6)


@pytest.mark.slow
def test_cli_recipe_with_fsdp2_trains_checkpoints_adapters_only_and_exports(
    bert_without_dropout, text_csv, tmp_path
):
    """``python -m finetune RECIPE --trainer.strategy=fsdp2 --trainer.devices=2`` with LoRA: sharded checkpoint
    folders holding only what trains, and an adapter export that plain peft loads with the trained logits."""
    import torch.distributed.checkpoint as dcp
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune.runs import load_run
    from tests.helpers.recipes import text_recipe, write

    recipe = text_recipe(bert_without_dropout, text_csv, tmp_path / "runs")
    recipe["trainer"].update({"strategy": "fsdp2", "devices": 2, "max_epochs": 1})
    recipe["model"]["init_args"]["strategy"] = "lora"
    path = write(recipe, tmp_path / "sharded.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "finetune", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "sharded" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    stored = dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata
    weights = [key for key in stored if key.startswith("state_dict.")]
    assert weights and all("lora_" in key or ".classifier." in key for key in weights)
    task = load_run(run).eval()
    base = AutoModelForSequenceClassification.from_pretrained(bert_without_dropout, num_labels=2)
    plain = PeftModel.from_pretrained(base, run / "export").eval()
    ids = torch.randint(5, 17, (3, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, task(batch), atol=1e-5)
