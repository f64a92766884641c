"""Does the image loader or the model bound a run? python -m bench.image_loader

    python -m bench.image_loader [--images 1024] [--sizes 96 224] [--augments none timm] [--workers 0 2]
                                 [--batches 24] [--repeats 3] [--table-rows 100000 1000000] [--json FILE]

Writes ``--images`` JPEG photos-like images (400x300: smooth colour fields with noise and shapes, quality
90, about what a phone export or a web image set holds) as class folders into a temporary directory, then,
in this one process:

- ``loader``: ``ImageClassificationData`` for ``timm:efficientnet_lite0`` (its preprocessing; no weights
  are loaded) at each ``image_size`` and ``augment``, ``num_workers`` 0 and 2, batch 32: images per second
  over ``--batches`` training batches after the first (which pays for starting the workers: reported apart);
- ``model``: one training step (forward, backward, AdamW) of EfficientNet-Lite0 (random init) on a batch
  of 32 at each size, images per second;
- ``path table``: for each of ``--table-rows``, a Parquet table listing that many rows (the images above,
  repeated), set up as the train split (read, paths resolved and checked, every image verified, labels,
  the 10% validation split) and its first 100 batches drawn, in a fresh process: seconds and peak RSS
  (the process's own high-water mark, VmHWM). Run twice per size: the second reuses the cache.

Each configuration is measured ``--repeats`` times, alternating, and reported as median (min-max). When the
loader's images/s is below the model's, the loader bounds the run: add workers, shrink the images on disk,
or drop the augmentation. Prints a markdown table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

BACKBONE = {"name": "timm:efficientnet_lite0", "pretrained": False}
BATCH = 32


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs in two class folders: colour gradients, noise and a rectangle, 400x300."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:300, 0:400] / np.array([300.0, 400.0]).reshape(2, 1, 1)
    for i in range(count):
        label = "a" if i % 2 else "b"
        (folder / label).mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, (3, 1, 1)) * (0.5 + 0.5 * (ys if i % 2 else xs))
        pixels = np.clip(base.transpose(1, 2, 0) + rng.normal(0, 20, (300, 400, 3)), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        box = sorted(rng.integers(0, 300, 2).tolist())
        ImageDraw.Draw(image).rectangle(
            [box[0], box[0], box[1] + 50, box[1]], fill=tuple(rng.integers(0, 255, 3).tolist())
        )
        image.save(folder / label / f"{i}.jpg", quality=90)


def loader_rate(folder: Path, size: int, augment: str, workers: int, batches: int) -> dict:
    """Images/s of the training loader over ``batches`` batches after its first, and the first's seconds."""
    from finetune.data import ImageClassificationData

    data = ImageClassificationData(
        train=str(folder),
        backbone=BACKBONE,
        image_size=size,
        augment=augment,
        batch_size=BATCH,
        num_workers=workers,
        val_fraction=0,
    )
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    start = time.perf_counter()
    next(iterator)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * BATCH / (time.perf_counter() - start)
    del iterator  # stops the workers before the next measurement
    return {"images_per_s": rate, "first_batch_s": first}


def model_rate(size: int, steps: int = 5) -> float:
    """Images/s of EfficientNet-Lite0 training steps (random init, 2 classes) on ``BATCH`` images."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(BATCH, 3, size, size), torch.randint(0, 2, (BATCH,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def table_setup(table: str) -> dict:
    """Runs in a child process: set up a path table as the train split and draw 100 batches."""
    from finetune.data import ImageClassificationData

    start = time.perf_counter()
    data = ImageClassificationData(train=table, backbone=BACKBONE, image_size=32, batch_size=BATCH)
    data.setup("fit")
    setup_s = time.perf_counter() - start
    iterator = iter(data.train_dataloader())
    for _ in range(100):
        next(iterator)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"setup_s": setup_s, "peak_mib": peak / 1024}


def table_runs(folder: Path, rows: int) -> list[dict]:
    """Two fresh processes setting up a ``rows``-row Parquet table of ``folder``'s images (cold, warm cache)."""
    import pandas as pd

    images = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*.jpg"))
    table = folder / f"table-{rows}.parquet"
    pd.DataFrame(
        {"path": [images[i % len(images)] for i in range(rows)], "label": ["a", "b"] * (rows // 2)}
    ).to_parquet(table)
    command = [sys.executable, "-m", "bench.image_loader", "--table-child", str(table)]
    results = []
    for _ in ("cold", "warm"):
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--augments", nargs="+", default=["none", "timm"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table-rows", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--table-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table_child:
        print(json.dumps(table_setup(args.table_child)))
        return
    configs = [(s, a, w) for s in args.sizes for a in args.augments for w in args.workers]
    loaders: dict[tuple, list[dict]] = {config: [] for config in configs}
    models: dict[int, list[float]] = {size: [] for size in args.sizes}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "images"
        write_images(folder, args.images)
        os.environ["HF_DATASETS_CACHE"] = str(Path(temporary) / "cache")
        for _ in range(args.repeats):
            for config in configs:
                loaders[config].append(loader_rate(folder, *config, args.batches))
            for size in args.sizes:
                models[size].append(model_rate(size))
        tables = {rows: table_runs(folder, rows) for rows in args.table_rows}
    lines = [
        f"CPU threads: {torch.get_num_threads()}; batch {BATCH}; {args.images} JPEGs of 400x300; "
        f"median (min-max) of {args.repeats}",
        "",
        "| image_size | augment | num_workers | loader images/s | first batch | model step images/s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for (size, augment, workers), runs in loaders.items():
        first = statistics.median(r["first_batch_s"] for r in runs)
        lines.append(
            f"| {size} | {augment} | {workers} | {spread([r['images_per_s'] for r in runs])} | "
            f"{first:.2f} s | {spread(models[size])} |"
        )
    if tables:
        lines += ["", "| path table rows | run | set-up | peak RSS |", "|---:|---|---:|---:|"]
        for rows, (cold, warm) in tables.items():
            for run, numbers in (("cold cache", cold), ("warm cache", warm)):
                lines.append(
                    f"| {rows:,} | {run} | {numbers['setup_s']:.1f} s | {numbers['peak_mib']:,.0f} MiB |"
                )
    print("\n".join(lines))
    if args.json:
        numbers = {
            "loader": [
                {"image_size": s, "augment": a, "num_workers": w, "runs": runs}
                for (s, a, w), runs in loaders.items()
            ],
            "model_images_per_s": {str(size): rates for size, rates in models.items()},
            "path_tables": {str(rows): runs for rows, runs in tables.items()},
        }
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
