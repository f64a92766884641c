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

from finetune.parallel.placement import is_sharded
from finetune.runs import load_checkpoint
from finetune.tasks import ClassificationTask
from tests.helpers.models import bert_folder, export_classifier, save_tiny_bert
from tests.helpers.parallel_run import LABELS, run_case

SCRIPT = Path(__file__).parents[1] / "helpers" / "parallel_run.py"
REPOSITORY = Path(__file__).parents[2]

# name -> the case (see tests/helpers/parallel_run.py); every case also runs in one process.
CASES = {
    "hf-full": {"kind": "hf", "strategy": "full"},
    "hf-partial": {"kind": "hf", "strategy": {"name": "partial", "last_blocks": 1}},
    "hf-lora": {"kind": "hf", "strategy": "lora"},
    "hf-unfreezing": {"kind": "hf", "strategy": "full", "unfreeze": True},
    "hf-checkpointing": {"kind": "hf", "strategy": "full", "fsdp2": {"activation_checkpointing": True}},
    "hf-distillation": {"kind": "hf", "strategy": "full", "distil": True},
    "timm-full": {"kind": "timm", "strategy": "full"},
    "timm-partial": {"kind": "timm", "strategy": {"name": "partial", "last_blocks": 1}},
    "timm-lora": {"kind": "timm", "strategy": "lora"},
    "llama-lora-token-loss": {"kind": "causal_lm", "strategy": "lora"},
    # QLoRA on FSDP: 4-bit weights packed in the compute dtype (float32 on CPU), so shards are uniform.
    "llama-qlora": {
        "kind": "causal_lm",
        "strategy": {"name": "qlora", "compute_dtype": "float32", "quant_storage": "float32"},
    },
}


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory) -> Path:
    """A tiny BERT whose forward is deterministic (no dropout), so process counts can be compared."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert-no-dropout"), dropout=0.0)


def case(name: str, root: Path, backbones: dict, teacher: Path, **extra) -> dict:
    spec = dict(CASES[name])
    backbone, vocab = backbones[spec["kind"]]
    if spec.pop("distil", False):
        spec["teacher"] = str(teacher)
    spec |= {"backbone": backbone, "vocab": vocab, "devices": 2, "batch": 8}
    return spec | {"root": str(root / name), "out": str(root / f"{name}.pt")} | extra


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, bert_without_dropout, tiny_timm_checkpoint, tiny_llama_dir) -> dict:
    """Every case (and a 1-epoch run with a sharded checkpoint, then its resumption) under torchrun."""
    root = tmp_path_factory.mktemp("fsdp2")
    from transformers import AutoTokenizer

    # A wider BERT teacher over the same classes and tokenizer, replicated on every process.
    teacher = export_classifier(
        bert_folder(root / "teacher-backbone", bert_without_dropout, hidden=48), LABELS, root / "teacher"
    )

    backbones = {
        "hf": (str(bert_without_dropout), len(AutoTokenizer.from_pretrained(bert_without_dropout))),
        "timm": ({"name": "timm:test_vit", "checkpoint": str(tiny_timm_checkpoint)}, 0),
        "causal_lm": (str(tiny_llama_dir), len(AutoTokenizer.from_pretrained(tiny_llama_dir))),
    }
    cases = [case(name, root, backbones, teacher) for name in CASES]
    checkpoints = str(root / "ckpt")
    half = case(
        "hf-full", root, backbones, teacher, epochs=1, checkpoints=checkpoints, out=str(root / "half.pt")
    )
    resume = str(root / "ckpt" / "last.ckpt")
    resumed = case("hf-full", root, backbones, teacher, resume=resume, out=str(root / "resumed.pt"))
    timm_ckpt = str(root / "timm-ckpt")
    timm_half = case(
        "timm-lora", root, backbones, teacher, epochs=1, checkpoints=timm_ckpt, out=str(root / "timm.pt")
    )
    extra = [half, resumed, timm_half]
    spec = root / "cases.json"
    spec.write_text(json.dumps([*cases, *extra]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(SCRIPT),
            str(spec),
        ],  # fmt: skip
        cwd=root,
        env=os.environ | {"PYTHONPATH": str(REPOSITORY)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = {c["out"]: torch.load(c["out"], weights_only=True) for c in [*cases, *extra]}
    return {
        "root": root,
        "backbones": backbones,
        "cases": cases,
        "results": results,
        "half": half,
        "resumed": resumed,
        "timm_half": timm_half,
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (4-bit weights packed into float32 words may read as NaN, which never equals itself)."""
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def changed(result: dict) -> set[str]:
    return {k for k, v in result["final"].items() if not same_bits(v, result["initial"][k])}


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
    # Per-sample means (classification) average over the ranks; token-level sums add up.
    combined = got["losses"].sum(0) if spec["kind"] == "causal_lm" else got["losses"].mean(0)
    assert torch.allclose(combined, reference["losses"][0], rtol=1e-4, atol=1e-6)
    # Sharded state dicts hold parameters and buffers; bitsandbytes' quantisation statistics ride along only
    # in the one-process state dict.
    assert set(got["final"]) <= set(reference["final"])
    moved = changed(got)
    assert moved == changed(reference)
    # Each trained parameter's update (final - initial) in 2 processes equals the 1-process update to within
    # 1% of its largest element: sums in another order round differently, and Adam's normalisation turns
    # that rounding into visible (but tiny) differences on elements whose gradient is nearly zero.
    for key in moved:
        update = (reference["final"][key] - reference["initial"][key]).abs().max()
        assert (got["final"][key] - reference["final"][key]).abs().max() <= 0.01 * update + 1e-6, key
    for key in set(got["final"]) - moved:  # frozen: bitwise what it was, in both runs
        assert same_bits(got["final"][key], reference["final"][key]), key
    kind, strategy = spec["kind"], spec["strategy"]
    if kind == "causal_lm":
        assert moved and all("lora_" in key for key in moved)
    else:
        prefixes = EXPECTED[strategy if isinstance(strategy, str) else f"partial-{kind}"]
        expected = {
            k for k in got["final"] if any(p in k if p == "lora_" else k.startswith(p) for p in prefixes)
        }
        assert moved == expected


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
    """A LoRA recipe with ``trainer.strategy: fsdp2`` launched by recipes/launch/torchrun.sh on 2 processes:
    sharded checkpoint folders holding only what trains, and an adapter export that plain peft loads with
    the trained logits."""
    import torch.distributed.checkpoint as dcp
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune.runs import load_run
    from tests.helpers.recipes import text_recipe, write

    recipe = text_recipe(bert_without_dropout, text_csv, tmp_path / "runs")
    recipe["trainer"].update({"strategy": "fsdp2", "max_epochs": 1})
    recipe["model"]["init_args"]["strategy"] = "lora"
    path = write(recipe, tmp_path / "sharded.yaml")
    # The shipped launch line for torchrun (one node, 2 processes; it sets trainer.devices and num_nodes).
    launch = REPOSITORY / "recipes" / "launch" / "torchrun.sh"
    port = str(29500 + os.getpid() % 1000)
    env = os.environ | {
        "GPUS": "2",
        "NNODES": "1",
        "MASTER_PORT": port,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    result = subprocess.run(
        ["bash", str(launch), str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
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


def test_qlora_under_fsdp2_needs_4bit_weights_stored_in_the_compute_dtype():
    from finetune.errors import RecipeError
    from finetune.parallel.fsdp2 import check_quantisation
    from finetune.strategies import QLoRA

    check_quantisation(QLoRA(compute_dtype="bfloat16", quant_storage="bfloat16"))
    with pytest.raises(RecipeError, match="model.strategy.quant_storage: .*set quant_storage: bfloat16"):
        check_quantisation(QLoRA(compute_dtype="bfloat16"))
    with pytest.raises(RecipeError, match="model.strategy.bits: 8-bit weights cannot be sharded"):
        check_quantisation(QLoRA(bits=8))


def test_fsdp2_is_a_registered_lightning_strategy_name():
    import lightning.pytorch as pl

    import finetune.parallel.fsdp2  # noqa: F401

    trainer = pl.Trainer(strategy="fsdp2", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy).__name__ == "FSDP2Strategy"


@pytest.mark.slow
def test_sharded_timm_lora_checkpoint_exports_a_merged_timm_model(sharded, tmp_path):
    """A timm LoRA run's shards consolidate into the trained adapters and head; ``export --merge`` gives a
    plain timm model with the trained logits."""
    import timm

    trained = sharded["results"][sharded["timm_half"]["out"]]
    task = load_checkpoint(Path(sharded["timm_half"]["checkpoints"]) / "last.ckpt", ClassificationTask)
    for key, value in task.state_dict().items():
        if "lora_" in key or key.startswith("model.head."):
            assert torch.equal(value, trained["final"][key]), key
    task.eval()
    pixels = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = task({"pixel_values": pixels})
        merged = timm.create_model(
            f"local-dir:{task.export(tmp_path / 'merged', merge=True)}", pretrained=True
        )
        assert torch.allclose(merged.eval()(pixels), expected, atol=1e-5)
