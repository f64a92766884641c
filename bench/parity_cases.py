"""The cases of ``bench.parity`` and how each is made ready: its finetune recipe, the same settings for the
hand loop, and the rows of finetune's own split exported for it.

A case is a recipe (a shipped one, or one written here) with overrides. ``prepare`` resolves it per seed
(``seed_everything`` and ``data.seed`` are the seed, so the split and the order move with it), writes the
recipe the finetune side runs, reads the hand loop's ``Settings`` from that same recipe, exports the split
rows finetune makes (``train/val/test.jsonl``, ``labels.json``) and warms finetune's data cache. With
``smoke``, tiny models and data stand in (``tests/helpers/models.py`` builders) and a run is 3 steps.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from bench.hand_loops import Settings

REPOSITORY = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)

LLAMA_SFT: dict[str, Any] = {
    "seed_everything": 0,
    "trainer": {"max_epochs": 8, "devices": 1, "precision": "32-true", "log_every_n_steps": 10},
    "model": {
        "class_path": "finetune.tasks.SFTTask",
        "init_args": {
            "backbone": None,  # the tiny Llama that ``prepare`` writes
            "strategy": {
                "class_path": "finetune.strategies.LoRA",
                "init_args": {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            },
            "samples": 0,  # no sample generations: the hand loop writes none
        },
    },
    "optimizer": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.01},
    "lr_scheduler": {"name": "cosine", "warmup_fraction": 0.1},
    "data": {
        "class_path": "finetune.data.InstructionData",
        "init_args": {
            "train": "recipes/data/instructions.jsonl",
            "val_fraction": 0.1,
            "max_length": 128,
            "batch_size": 4,
        },
    },
}


@dataclass(frozen=True)
class Case:
    """A finetune recipe (``recipe``: a shipped file, or a dict) with ``overrides`` (dotted keys), the hand
    loop that does its work (``loop``: a function of ``bench.hand_loops``) and the figure that says how
    well it learnt (``metric``)."""

    name: str
    loop: str
    recipe: str | dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    metric: str = "test/acc"
    higher_is_better: bool = True


CASES = {
    case.name: case
    for case in (
        Case(
            "minilm-full", "text_classifier", "recipes/quickstart.yaml", {"model.init_args.strategy": "full"}
        ),
        Case("minilm-partial", "text_classifier", "recipes/quickstart.yaml"),
        Case("minilm-lora", "text_classifier", "recipes/minilm-lora.yaml"),
        Case("minilm-freeze", "text_classifier", "recipes/minilm-probe.yaml"),
        Case("vision", "image_classifier", "recipes/quickstart-vision.yaml"),
        Case("llama-sft-lora", "sft_lora", LLAMA_SFT, metric="val/loss", higher_is_better=False),
    )
}

# One epoch of 2-4 steps on the smoke data (Lightning validates at the end of an epoch, not at max_steps).
SMOKE_RUN = {"trainer.max_epochs": 1, "trainer.enable_progress_bar": False, "data.init_args.batch_size": 16}


# --- recipes ------------------------------------------------------------------------------------------------


def base_recipe(case: Case) -> dict[str, Any]:
    if isinstance(case.recipe, dict):
        return copy.deepcopy(case.recipe)
    return yaml.safe_load((REPOSITORY / case.recipe).read_text())


def with_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with each dotted key set (intermediate sections are created)."""
    recipe = copy.deepcopy(recipe)
    for key, value in overrides.items():
        *sections, last = key.split(".")
        node = recipe
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value
    return recipe


def absolute(path: str) -> str:
    """A repository-relative path made absolute (runs start elsewhere); ``pkg://`` and others unchanged."""
    return str(REPOSITORY / path) if not path.startswith("pkg://") and (REPOSITORY / path).exists() else path


# --- the hand loop's settings, read from the recipe ---------------------------------------------------------

# Trainer keys that change nothing the hand loops do (max_steps, accumulation, clipping would).
TRAINER_KEYS = {
    "max_epochs",
    "accelerator",
    "devices",
    "precision",
    "log_every_n_steps",
    "default_root_dir",
    "enable_progress_bar",
}
HEAD_NAMES = {"text_classifier": "head.1.weight", "image_classifier": "classifier.weight", "sft_lora": ""}
BODY_NAMES = ("encoder.encoder.layer.0.attention.self.query.weight", "blocks.0.0.conv_dw.weight")


def settings(recipe: dict[str, Any], loop: str, device: str) -> Settings:
    """The hand loop's ``Settings`` for ``recipe``; ValueError naming a key the hand loops have no
    equivalent for (other optimizers, groups other than the head's, schedule floors ...)."""
    from bench.hand_loops import Settings  # torch: not in the parent process

    model = recipe["model"]["init_args"]
    backbone = model["backbone"] if isinstance(model["backbone"], dict) else {"name": model["backbone"]}
    strategy, options = strategy_of(model.get("strategy", "lora" if loop == "sft_lora" else "full"))
    optimizer = recipe.get("optimizer", {})
    schedule = recipe.get("lr_scheduler", {})
    trainer, data = recipe["trainer"], recipe["data"]["init_args"]
    unsupported(optimizer, {"name", "lr", "weight_decay", "groups"}, "optimizer")
    unsupported(schedule, {"name", "warmup_fraction"}, "lr_scheduler")
    unsupported(options, {"last_blocks", "rank", "alpha", "dropout", "target_modules"}, "model.strategy")
    unsupported(trainer, TRAINER_KEYS, "trainer")
    if str(trainer.get("precision", "32-true")) not in ("32", "32-true"):
        raise ValueError("trainer.precision: the hand loops train in float32")
    if (
        optimizer.get("name", "adamw") != "adamw"
        or options.get("target_modules", "all-linear") != "all-linear"
    ):
        raise ValueError(
            "optimizer.name / model.strategy.target_modules: the hand loops use AdamW, all-linear"
        )
    name = backbone["name"]
    return Settings(
        model=name.partition(":")[2] if name.startswith(("timm:", "hf:")) else local_path(name),
        seed=recipe["seed_everything"],
        lr=optimizer.get("lr", 1e-4),
        epochs=trainer["max_epochs"],
        batch_size=data.get("batch_size", 32),
        head_lr=head_lr(optimizer.get("groups", []), HEAD_NAMES[loop]),
        weight_decay=optimizer.get("weight_decay", 0.01),
        schedule=schedule.get("name", "constant"),
        warmup_fraction=schedule.get("warmup_fraction") or 0.0,
        strategy=strategy,
        last_blocks=options.get("last_blocks", 1 if strategy == "partial" else 0),
        lora={
            key: options.get(key, default)
            for key, default in (("rank", 8), ("alpha", 16.0), ("dropout", 0.0))
        },
        head_dropout=(model.get("head") or {}).get("dropout", 0.0),
        max_length=data.get("max_length", 128),
        image_size=data.get("image_size"),
        checkpoint=backbone.get("checkpoint"),
        pretrained=backbone.get("pretrained", True),
        device=device,
    )


def strategy_of(value: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A recipe's strategy as (registered name, its arguments)."""
    if isinstance(value, str):
        return value, {}
    return value["class_path"].rpartition(".")[2].lower(), dict(value.get("init_args", {}))


def head_lr(groups: list[dict[str, Any]], head: str) -> float | None:
    """The LR of the group that takes the head; a group that takes anything else has no hand equivalent."""
    found = None
    for group in groups:
        unsupported(group, {"pattern", "lr"}, "optimizer.groups")
        if (
            not head
            or not re.search(group["pattern"], head)
            or any(re.search(group["pattern"], b) for b in BODY_NAMES)
        ):
            raise ValueError(f"optimizer.groups: {group['pattern']!r} is not the head's group")
        found = group["lr"]
    return found


def unsupported(section: dict[str, Any], known: set[str], key: str) -> None:
    extra = sorted(set(section) - known)
    if extra:
        raise ValueError(f"{key}: the hand loops have no equivalent of {', '.join(extra)}")


def local_path(name: str) -> str:
    from finetune.paths import resolve_path

    return str(resolve_path(name, "model.backbone"))


# --- preparing a case ---------------------------------------------------------------------------------------


def prepare(
    case: Case, seeds: list[int], work: Path, smoke: bool, device: str, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write each seed's recipe (with ``changes``, dotted keys, last) and exported rows under ``work``;
    return the manifest the runs read: ``{seed: {"recipe": file, "rows": folder, "settings": Settings as
    a dict}}``."""
    overrides = {
        **case.overrides,
        **assets(case, work / "assets", smoke),
        **(SMOKE_RUN if smoke else {}),
        **(changes or {}),
        "trainer.accelerator": "gpu" if device == "cuda" else "cpu",
        "data.init_args.cache_dir": str(work / "cache"),
    }
    manifest = {}
    for seed in seeds:
        recipe = with_overrides(
            base_recipe(case), {**overrides, "seed_everything": seed, "data.init_args.seed": seed}
        )
        recipe["data"]["init_args"]["train"] = absolute(recipe["data"]["init_args"]["train"])
        folder = work / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        export_rows(recipe, folder / "rows", case.loop)
        manifest[str(seed)] = {
            "recipe": str(path),
            "rows": str(folder / "rows"),
            "settings": asdict(settings(recipe, case.loop, device)),
        }
    return manifest


def export_rows(recipe: dict[str, Any], folder: Path, loop: str) -> None:
    """The rows of each split as finetune's data module of ``recipe`` holds them, as JSON lines (texts or
    image paths with class ids, or conversations); its cache is left warm for the finetune side."""
    from finetune.runs import import_class

    arguments = dict(recipe["data"]["init_args"], backbone=recipe["model"]["init_args"]["backbone"])
    data = import_class(recipe["data"]["class_path"], "data.class_path")(**arguments)
    folder.mkdir(parents=True, exist_ok=True)
    if loop == "sft_lora":
        for split, conversations in data.conversations.items():
            write_lines(folder / f"{split}.jsonl", [{"messages": m} for m in conversations["messages"]])
        data.datasets  # noqa: B018 - tokenises into the cache
        return
    key, column = ("path", data.path_column) if loop == "image_classifier" else ("text", data.text_column)
    index = {label: i for i, label in enumerate(data.labels)}
    for split in ("train", "val", "test"):
        table = data.table(split)
        pairs = zip(table[column], table[data.label_column])
        # An empty cell is an empty text to finetune.
        write_lines(folder / f"{split}.jsonl", [{key: x or "", "label": index[str(y)]} for x, y in pairs])
    (folder / "labels.json").write_text(json.dumps(data.labels))
    data.setup("fit")
    data.setup("test")


def write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


# --- models and data the cases need -------------------------------------------------------------------------


def assets(case: Case, folder: Path, smoke: bool) -> dict[str, Any]:
    """Write what the case needs beyond installed packages into ``folder``; return the recipe overrides
    that point at it (with ``smoke``: tiny stand-ins of the same kind)."""
    folder.mkdir(parents=True, exist_ok=True)
    if case.loop == "sft_lora":
        size = {"hidden": 64, "layers": 2} if smoke else {"hidden": 256, "layers": 4}
        return {"model.init_args.backbone": str(tiny_llama(folder / "llama", **size))}
    if case.loop == "text_classifier":
        if not smoke:
            return {}
        return {
            "model.init_args.backbone": str(sentence_encoder(folder / "encoder")),
            "data.init_args.train": str(sentiment_csv(folder / "reviews.csv")),
        }
    if smoke:
        return {
            "model.init_args.backbone": {"name": "timm:test_efficientnet", "pretrained": False},
            "data.init_args.train": str(coloured_images(folder / "images")),
            "data.init_args.image_size": 32,
        }
    recipe = base_recipe(case)
    weights = Path(absolute(recipe["model"]["init_args"]["backbone"]["checkpoint"]))
    images = Path(absolute(recipe["data"]["init_args"]["train"]))
    if not (weights.is_file() and images.is_dir()):
        from bench.images import prepare as prepare_images

        written = prepare_images(folder / "vision")
        weights, images = written["checkpoint"], written["images"]
    return {"model.init_args.backbone.checkpoint": str(weights), "data.init_args.train": str(images)}


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}### {{ m['role'] }} :\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant :\n{% endif %}"
)


def tiny_llama(directory: Path, hidden: int, layers: int) -> Path:
    """A random Llama with a word-level tokenizer over the words of the instruction file and a chat
    template (so both sides render conversations by ``apply_chat_template``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers.models import save_llama

    split = pre_tokenizers.Whitespace()
    texts = ["### system user assistant :"]
    for line in (REPOSITORY / LLAMA_SFT["data"]["init_args"]["train"]).read_text().splitlines():
        row = json.loads(line)
        texts += (
            [m["content"] for m in row["messages"]] if "messages" in row else [row["prompt"], row["response"]]
        )
    words = sorted({word for text in texts for word, _ in split.pre_tokenize_str(text)})
    vocab = ["<pad>", "<unk>", "<s>", "</s>", *words]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = split
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )
    directory.mkdir(parents=True, exist_ok=True)
    return save_llama(directory, tokenizer, hidden=hidden, layers=layers, seed=0)


def sentence_encoder(directory: Path) -> Path:
    """A tiny random BERT 6 blocks deep (as MiniLM, so the partial recipe applies), marked as a
    sentence-transformers model that mean-pools (as MiniLM is)."""
    from tests.helpers.models import bert_folder, make_tokenizer

    make_tokenizer(directory / "tokenizer")
    bert_folder(directory, directory / "tokenizer", hidden=32, layers=6)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return directory


def sentiment_csv(path: Path, rows: int = 80) -> Path:
    """``rows`` sentences labelled positive/negative by a keyword, in the quickstart's columns."""
    from tests.helpers.models import sentence

    rng = random.Random(0)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "sentiment"])
        for i in range(rows):
            label = "positive" if i % 2 else "negative"
            writer.writerow([sentence(rng, label), label])
    return path


def coloured_images(folder: Path, per_class: int = 14) -> Path:
    """Class folders ``red/`` and ``blue/`` of noisy 40x40 PNGs, told apart by their strong channel."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(170, 255, size=(40, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder
