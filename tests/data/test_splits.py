"""hold_out: the seeded ``limit`` sample and held-out splits, the same rows as pandas' sampling gave, and
both data modules holding out through it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from finetune.data import InstructionData, TextClassificationData
from finetune.data.splits import check_hold_out, hold_out
from finetune.errors import RecipeError


def reference(size, fractions, seed, limit):
    """The rows ClassificationData selected before hold_out existed (pandas sample, then one permutation)."""
    table = pd.DataFrame({"row": range(size)})
    if limit is not None and limit < size:
        table = table.sample(n=limit, random_state=seed).sort_index()
    order = np.random.default_rng(seed).permutation(len(table))
    splits, start = {}, 0
    for split, fraction in fractions.items():
        if fraction > 0:
            count = max(1, round(len(table) * fraction))
            splits[split] = table["row"].to_numpy()[np.sort(order[start : start + count])]
            start += count
    return {"train": table["row"].to_numpy()[np.sort(order[start:])], **splits}


def as_lists(splits):
    return {split: rows.tolist() for split, rows in splits.items()}


@pytest.mark.parametrize(
    ("size", "fractions", "seed", "limit"),
    [
        (100, {"val": 0.1, "test": 0.2}, 42, None),
        (100, {"val": 0.1, "test": 0.2}, 7, 30),
        (1000, {"val": 0.15}, 0, 333),
        (50, {"test": 0.3, "val": 0.1}, 3, 49),
        (10, {"val": 0.0, "test": 0.25}, 1, None),
        (20, {}, 5, 8),
    ],
)
def test_selects_the_rows_pandas_sampling_selected(size, fractions, seed, limit):
    assert as_lists(hold_out(size, fractions, seed, limit)) == as_lists(
        reference(size, fractions, seed, limit)
    )


def test_is_deterministic_for_a_seed():
    def split(seed):
        return as_lists(hold_out(200, {"val": 0.1, "test": 0.1}, seed, limit=120))

    assert split(4) == split(4)
    assert split(4)["val"] != split(5)["val"]
    assert split(4)["train"] != split(5)["train"]


@pytest.mark.parametrize("limit", [None, 37, 100, 500])
def test_splits_are_disjoint_sorted_and_together_the_sample(limit):
    splits = hold_out(100, {"val": 0.2, "test": 0.1}, seed=11, limit=limit)
    rows = [row for indices in splits.values() for row in indices.tolist()]
    assert len(rows) == len(set(rows)) == min(limit or 100, 100)
    assert all(list(indices) == sorted(indices) for indices in splits.values())
    assert set(rows) <= set(range(100))


def test_sizes_follow_the_fractions():
    sizes = {split: len(rows) for split, rows in hold_out(40, {"val": 0.1, "test": 0.25}, seed=0).items()}
    assert sizes == {"train": 26, "val": 4, "test": 10}
    # A tiny fraction still holds out one row; a zero one holds out none (the split is absent).
    sizes = {split: len(rows) for split, rows in hold_out(10, {"val": 0.01, "test": 0.0}, seed=0).items()}
    assert sizes == {"train": 9, "val": 1}
    assert {split: len(rows) for split, rows in hold_out(10, {}, seed=0, limit=6).items()} == {"train": 6}


@pytest.mark.parametrize("seed", [0, 1, 42, 1234])
def test_limit_samples_the_rows_pandas_samples(seed):
    table = pd.DataFrame({"row": range(75)})
    expected = sorted(table.sample(n=20, random_state=seed).index)
    splits = hold_out(75, {"val": 0.25}, seed, limit=20)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == expected


@pytest.mark.parametrize(
    ("size", "fractions", "limit"),
    [(2, {"val": 0.5, "test": 0.4}, None), (1, {"val": 0.1}, None), (100, {"val": 0.5, "test": 0.5}, 2)],
)
def test_holding_out_every_row_is_an_error(size, fractions, limit):
    with pytest.raises(RecipeError, match="leaves none to train on") as info:
        hold_out(size, fractions, seed=0, limit=limit)
    assert info.value.key == "data.val_fraction"


@pytest.mark.parametrize(
    ("fractions", "limit", "key"),
    [
        ({"val": 1.0}, None, "data.val_fraction"),
        ({"val": 0.1, "test": -0.1}, None, "data.test_fraction"),
        ({"val": 0.6, "test": 0.4}, None, "data.test_fraction"),
        ({"val": 0.1}, 0, "data.limit"),
    ],
)
def test_unusable_settings_name_their_key(fractions, limit, key):
    with pytest.raises(RecipeError) as info:
        check_hold_out(fractions, limit)
    assert info.value.key == key


def test_instruction_and_text_data_hold_out_the_same_positions(tmp_path, write_csv):
    count, settings = 40, {"val_fraction": 0.2, "limit": 30, "seed": 9}
    jsonl = tmp_path / "chat.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(count)))
    table = write_csv("rows.csv", id=list(range(count)), text=["x"] * count, label=["a", "b"] * (count // 2))

    conversations = InstructionData(train=str(jsonl), **settings).conversations
    text = TextClassificationData(train=str(table), **settings)
    positions = {
        split: [int(messages[0]["content"][1:]) for messages in conversations[split]["messages"]]
        for split in ("train", "val")
    }
    expected = as_lists(hold_out(count, {"val": 0.2}, seed=9, limit=30))
    assert positions == {split: expected[split] for split in ("train", "val")}
    assert {split: list(text.table(split)["id"]) for split in ("train", "val")} == positions
