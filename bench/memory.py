"""Memory estimate vs measured peak on CPU: python bench/memory.py

Each config runs in a fresh process: the resident set size before the model exists is the baseline; the
measured peak (``ru_maxrss``) after building the model and optimizer and taking 3 optimizer steps, minus the
baseline, is compared with ``finetune.memory``'s estimate for the same model, optimizer and batch.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

CONFIGS = [
    {
        "name": "bert-4x256 full adamw b16",
        "layers": 4,
        "hidden": 256,
        "batch": 16,
        "optimizer": "adamw",
        "train": "full",
    },
    {
        "name": "bert-4x256 full sgd b16",
        "layers": 4,
        "hidden": 256,
        "batch": 16,
        "optimizer": "sgd",
        "train": "full",
    },
    {
        "name": "bert-4x256 head-only adamw b16",
        "layers": 4,
        "hidden": 256,
        "batch": 16,
        "optimizer": "adamw",
        "train": "head",
    },
    {
        "name": "bert-8x512 full adamw b8",
        "layers": 8,
        "hidden": 512,
        "batch": 8,
        "optimizer": "adamw",
        "train": "full",
    },
    {
        "name": "bert-8x512 full adamw b32",
        "layers": 8,
        "hidden": 512,
        "batch": 32,
        "optimizer": "adamw",
        "train": "full",
    },
]
SEQUENCE = 128


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(config: dict) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from finetune.backbones.layout import discover_layout
    from finetune.memory import activation_bytes, estimate_memory
    from finetune.optim import OptimizerConfig
    from finetune.optim.groups import param_groups
    from finetune.optim.optimizers import build_optimizer, state_bytes

    torch.set_num_threads(2)
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 1000, (config["batch"], SEQUENCE)),
        "labels": torch.randint(0, 2, (config["batch"],)),
    }
    baseline = rss()
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=1000,
            hidden_size=config["hidden"],
            num_hidden_layers=config["layers"],
            num_attention_heads=4,
            intermediate_size=4 * config["hidden"],
            max_position_embeddings=SEQUENCE,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    if config["train"] == "head":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("classifier"))
    optimizer_config = OptimizerConfig(name=config["optimizer"], lr=1e-4)
    optimizer = build_optimizer(
        param_groups(model, discover_layout(model, ("classifier",)), optimizer_config), optimizer_config
    )
    activations = activation_bytes(model, lambda: model(**batch).loss, "32-true", torch.device("cpu"))
    estimate = estimate_memory(model, "32-true", state_bytes(optimizer_config), activations)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as the estimate assumes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"name": config["name"], "estimate": estimate.total, "measured": peak, "activations": activations}


def main() -> None:
    if len(sys.argv) > 1:
        print(json.dumps(measure(json.loads(sys.argv[1]))))
        return
    print("| config | estimate (MiB) | measured peak (MiB) | error |")
    print("|---|---:|---:|---:|")
    for config in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, json.dumps(config)], capture_output=True, text=True, check=True
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        error = (result["estimate"] - result["measured"]) / result["measured"]
        print(
            f"| {result['name']} | {result['estimate'] / 2**20:.0f} | {result['measured'] / 2**20:.0f} | {error:+.0%} |"
        )


if __name__ == "__main__":
    main()
