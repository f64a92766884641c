"""Synthetic preference pairs in the tiny Llama's word vocabulary (tests/helpers/models.py), and their data."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from finetune.data.preferences import PreferenceData

POSITIVE = ["good", "great", "fine"]
NEGATIVE = ["bad", "awful", "poor"]
FILLER = ["movie", "food", "day", "very", "okay", "hello", "world"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rule_pairs(count: int, seed: int, fillers: list[str] = FILLER) -> list[dict[str, str]]:
    """Pairs whose chosen response names a positive word and whose rejected one a negative word, between two
    of ``fillers`` that the prompt names."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        filler = rng.sample(fillers, 2)
        rows.append(
            {
                "prompt": f"say {' '.join(filler)}",
                "chosen": f"{filler[0]} {rng.choice(POSITIVE)} {filler[1]}",
                "rejected": f"{filler[0]} {rng.choice(NEGATIVE)} {filler[1]}",
            }
        )
    return rows


def pair_data(backbone: Path | str, train: Path, **kwargs: Any) -> PreferenceData:
    """PreferenceData on ``train`` for ``backbone``, no held-out split unless ``kwargs`` says so."""
    options = {"val_fraction": 0.0, "batch_size": 4} | kwargs
    return PreferenceData(train=str(train), backbone=str(backbone), **options)
