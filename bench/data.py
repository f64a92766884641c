"""Memory and set-up time of text data as the corpus grows: python -m bench.data

Generates CSVs of short texts (8 words, 3 labels) with 100,000 and 2,000,000 rows into a temporary folder,
and a tiny word-level BERT for them, then measures each configuration in a fresh process:

- ``loader``: ``TextClassificationData(train=CSV, batch_size=32, num_workers=0)``, ``setup("fit")``, the
  training ``DataLoader`` and its first 1,000 batches (no model). Reports the set-up time (module built to
  loader ready), RSS after the imports and the process's peak RSS. Run twice per size (``--runs``): the
  first run starts from an empty cache folder, the second reuses what the first wrote.
- ``plan``: ``python -m finetune plan`` on a recipe training the tiny BERT on the CSV, and its peak RSS:
  once with a cache of its own (cold: it converts and tokenises), once with the loader runs' (warm).
- ``loader (streaming)`` (``--streaming``): the same loader with ``streaming: true``.

Peak RSS is the kernel's high-water mark of the measured process's own memory (``VmHWM``): ``ru_maxrss``
would also count the RSS of the process that started it (Linux keeps it across ``exec``).

A process whose RSS passes ``--cap-gib`` is killed and reported as above it, so measuring code that holds
every row in memory cannot exhaust the machine. ``--code DIR`` measures the ``finetune`` package found in
``DIR`` (e.g. an export of an older commit: ``git archive HEAD | tar -x -C DIR``). Prints a markdown table;
``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
LABELS = ("negative", "neutral", "positive")
MIB = 2**20


def generate(path: Path, rows: int, seed: int = 0) -> Path:
    """A CSV of ``rows`` texts of 8 words drawn from the tiny tokenizer's vocabulary, and a label each."""
    import numpy as np
    import pandas as pd

    from tests.helpers.models import WORDS

    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    picks = words[rng.integers(0, len(words), size=(rows, 8))]
    texts = [" ".join(row) for row in picks]
    labels = np.array(LABELS, dtype=object)[rng.integers(0, len(LABELS), size=rows)]
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def make_model(directory: Path) -> Path:
    from tests.helpers.models import bert_folder, make_tokenizer

    make_tokenizer(directory / "tokenizer")
    return bert_folder(directory / "bert", directory / "tokenizer", hidden=32)


def memory(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def measure_loader(csv: str, model: str, batches: int, workers: int, streaming: bool = False) -> dict:
    """Runs in the measured process: build the data and its loader, then draw ``batches`` batches."""
    import torch

    from finetune.data import TextClassificationData

    torch.set_num_threads(1)
    imported = memory("VmRSS")
    start = time.perf_counter()
    options = {"streaming": True, "val_fraction": 0, "labels": list(LABELS)} if streaming else {}
    data = TextClassificationData(train=csv, backbone=model, batch_size=32, num_workers=workers, **options)
    data.setup("fit")
    loader = data.train_dataloader()
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    drawn = 0
    for drawn, _ in enumerate(loader, start=1):
        if drawn == batches:
            break
    return {
        "imported_mib": imported / MIB,
        "setup_s": setup_s,
        "iterate_s": time.perf_counter() - start,
        "batches": drawn,
        "peak_mib": memory("VmHWM") / MIB,
    }


def measure_plan(recipe: str) -> dict:
    """Runs in the measured process: ``python -m finetune plan RECIPE``."""
    import runpy

    sys.argv = ["finetune", "plan", recipe]
    try:
        runpy.run_module("finetune", run_name="__main__")
    except SystemExit as done:
        if done.code:
            raise
    return {"peak_mib": memory("VmHWM") / MIB}


def run_capped(command: list[str], env: dict, cwd: Path, cap: int) -> tuple[bool, str, float]:
    """Run ``command``; return (whether it finished under ``cap`` bytes of RSS, its output, seconds)."""
    import psutil

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
        killed = threading.Event()

        def watch() -> None:
            try:
                watched = psutil.Process(process.pid)
                while process.returncode is None and not killed.is_set():
                    tree = [watched, *watched.children(recursive=True)]
                    if sum(p.memory_info().rss for p in tree if p.is_running()) > cap:
                        killed.set()
                        process.kill()
                    time.sleep(0.2)
            except psutil.Error:
                pass

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        process.wait()
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if killed.is_set():
        return False, text, seconds
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return True, text, seconds


def write_recipe(path: Path, csv: Path, model: Path) -> Path:
    path.write_text(
        "trainer: {max_epochs: 1, accelerator: cpu}\n"
        "model:\n  class_path: finetune.ClassificationTask\n"
        f"  init_args: {{backbone: {model}, strategy: full}}\n"
        "data:\n  class_path: finetune.data.TextClassificationData\n"
        f"  init_args: {{train: {csv}, batch_size: 32}}\n"
    )
    return path


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    model = make_model(work / "model")
    code = Path(args.code).resolve() if args.code else REPOSITORY
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(code), str(REPOSITORY)]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    cap = int(args.cap_gib * 2**30)
    # This file by path, so that `finetune` comes from `code` (first on PYTHONPATH) and not from the
    # folder a `python -m` would put first.
    script = [sys.executable, str(Path(__file__).resolve())]
    results = []
    for rows in args.rows:
        csv = work / f"texts-{rows}.csv"
        run_capped([*script, "--generate", str(rows), str(csv)], env, work, cap)
        recipe = write_recipe(work / f"recipe-{rows}.yaml", csv, model)
        child = [*script, "--batches", str(args.batches), "--child"]
        loader, plan = [*child, "loader", str(csv), str(model)], [*child, "plan", str(recipe)]
        steps = [(f"loader (run {n + 1})", loader, "") for n in range(args.runs)]
        steps += [("plan (cold cache)", plan, "-plan"), ("plan (warm cache)", plan, "")]
        if args.streaming:
            steps.append(("loader (streaming)", [*child, "stream", str(csv), str(model)], "-stream"))
        for what, command, cache in steps:
            env["HF_DATASETS_CACHE"] = str(work / f"cache-{rows}{cache}")  # each cold cache starts empty
            finished, text, seconds = run_capped(command, env, work, cap)
            last = [line for line in text.splitlines() if line.startswith("{")][-1:] if finished else []
            numbers = json.loads(last[0]) if last else {"peak_mib": None}
            results.append({"rows": rows, "what": what, "wall_s": seconds, **numbers})
            print(json.dumps(results[-1]), flush=True)
    return results


def table(results: list[dict], cap_gib: float) -> str:
    lines = ["| rows | measured | peak RSS | set-up | wall |", "|---:|---|---:|---:|---:|"]
    for r in results:
        peak = f"> {cap_gib:g} GiB (killed)" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f} MiB"
        setup = f"{r['setup_s']:.2f} s" if "setup_s" in r else ""
        lines.append(f"| {r['rows']:,} | {r['what']} | {peak} | {setup} | {r['wall_s']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 2_000_000])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers of the loader runs")
    parser.add_argument("--code", help="folder holding the finetune package to measure (default: this one)")
    parser.add_argument("--cap-gib", type=float, default=12.0)
    parser.add_argument("--work", help="folder for the CSVs, model and caches (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--runs", type=int, default=2, help="loader runs per size (the first fills the cache)"
    )
    parser.add_argument(
        "--streaming", action="store_true", help="also measure the loader with streaming: true"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, metavar=("ROWS", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[1]), int(args.generate[0]))
        return
    if args.child:
        kind, *rest = args.child
        if kind == "plan":
            numbers = measure_plan(*rest)
        else:
            numbers = measure_loader(*rest, args.batches, args.workers, streaming=kind == "stream")
        print(json.dumps(numbers))
        return
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        work.mkdir(parents=True, exist_ok=True)
        results = run(args, work)
    print(table(results, args.cap_gib))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
