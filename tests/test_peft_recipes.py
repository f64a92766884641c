"""The shipped QLoRA SFT recipe end to end through the CLI (tiny local Llama), its merged export reloaded
with plain transformers, and bad adapter input through the CLI: exit status 2 and one line naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from tests.helpers.recipes import image_recipe, text_recipe, write

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.slow
def test_qlora_sft_recipe_end_to_end_and_merged_export(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code = main(
        [
            str(RECIPES / "qlora-sft.yaml"),
            f"--model.init_args.backbone={tiny_llama_dir}",
            f"--data.init_args.train={RECIPES / 'data' / 'instructions.jsonl'}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert code == 0
    run = tmp_path / "qlora-sft" / "version_0"
    assert json.loads((run / "export" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all({"prompt", "generation", "reference"} <= set(s) for s in samples)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state)
    assert "adapters on 14 modules" in (run / "parameters.txt").read_text()

    assert main(["export", str(run), "--merge"]) == 0
    merged = run / "export-merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    prompt = tokenizer("### Instruction: say hello", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def one_line_error(capsys, argv, key):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Library progress bars may come before it; the error itself is one line, the last.
    assert err[-1].startswith(f"finetune: error: {key}"), err
    assert sum("finetune:" in line or "Traceback" in line for line in err) == 1, err


def test_bad_adapter_input_through_the_cli(
    tiny_bert_dir, tiny_timm_checkpoint, text_csv, image_folder, tmp_path, capsys
):
    recipe = text_recipe(tiny_bert_dir, text_csv, tmp_path)
    recipe["model"]["init_args"]["strategy"] = {
        "class_path": "finetune.strategies.LoRA",
        "init_args": {"target_modules": ["nope"]},
    }
    one_line_error(
        capsys, [str(write(recipe, tmp_path / "lora.yaml"))], "model.strategy.target_modules: 'nope'"
    )
    recipe = image_recipe(tiny_timm_checkpoint, image_folder, tmp_path)
    recipe["model"]["init_args"]["strategy"] = "qlora"
    one_line_error(capsys, [str(write(recipe, tmp_path / "qlora.yaml"))], "model.strategy: ")
    one_line_error(capsys, ["export", str(tmp_path / "missing")], "RUN_DIR: ")
    one_line_error(capsys, ["export", str(tmp_path)], "RUN_DIR: ")
