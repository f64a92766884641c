"""InstructionData: exactly the prompt, template and padding positions are -100; chat templates, packing,
truncation and bad files."""

from __future__ import annotations

import json

import pytest

from finetune.data.instructions import IGNORE, InstructionData, segments, tokenize
from finetune.errors import RecipeError


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


ROWS = [
    {"prompt": "say hello", "response": "hello world"},
    {"prompt": "count", "response": "one two three"},
    {"messages": [{"role": "user", "content": "say world"}, {"role": "assistant", "content": "world"}]},
]


def data(tiny_llama_dir, path, **kwargs):
    module = InstructionData(train=str(path), val_fraction=0, backbone=str(tiny_llama_dir), **kwargs)
    return module, module.tokenizer


def test_labels_mask_exactly_prompt_and_padding(tiny_llama_dir, tmp_path):
    module, tok = data(tiny_llama_dir, write_jsonl(tmp_path / "d.jsonl", ROWS), batch_size=3)
    batch = next(iter(module.train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        words = tok.convert_ids_to_tokens(ids.tolist())
        n = int(mask.sum())
        # Plain template: <s> ### Instruction: PROMPT ### Response: RESPONSE </s>, then padding.
        start = words.index("Response:") + 1
        response = set(range(start, n))
        assert words[n - 1] == "</s>" and all(w == "<pad>" for w in words[n:])
        for position, label in enumerate(labels.tolist()):
            if position in response:
                assert label == ids[position]
            else:
                assert label == IGNORE, (position, words[position])


def test_chat_template_masks_every_assistant_turn(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}### {{ m['role'] }} {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}### assistant {% endif %}"
    )
    messages = [
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "count"},
        {"role": "assistant", "content": "one two"},
    ]
    row = tokenize(tok, segments(tok, messages), max_length=64)
    kept = [
        tok.convert_ids_to_tokens(i) for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE
    ]
    assert kept == ["hello", "</s>", "one", "two", "</s>"]
    assert row["input_ids"].count(tok.bos_token_id) == 1


def test_truncation_packing_and_val_split(tiny_llama_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    module, _ = data(tiny_llama_dir, path, max_length=6)
    assert all(len(ids) <= 6 for ids in module.datasets["train"].tokens["input_ids"])
    packed, _ = data(tiny_llama_dir, path, max_length=16, packing=True, batch_size=2)
    rows = list(packed.datasets["train"].tokens["input_ids"])
    assert all(len(ids) == 16 for ids in rows[:-1])
    split = InstructionData(train=str(path), val_fraction=0.25, backbone=str(tiny_llama_dir))
    assert len(split.conversations["val"]) == 3 and len(split.conversations["train"]) == 9
    sample = split.sample_prompts(1)[0]
    assert (
        sample["prompt"].endswith("### Response:\n")
        and sample["prompt_ids"][0] == split.tokenizer.bos_token_id
    )


def pack_reference(rows, length):
    """How rows were packed before packing was a map: all of them concatenated, then cut every ``length``."""
    ids = [t for row in rows for t in row["input_ids"]]
    labels = [t for row in rows for t in row["labels"]]
    return [
        {"input_ids": ids[i : i + length], "labels": labels[i : i + length]}
        for i in range(0, len(ids), length)
    ]


def test_packing_concatenates_every_row_across_map_batches(tiny_llama_dir, tmp_path):
    # 2,400 conversations pack into more than 1,000 rows: the packing map's batches must join up exactly.
    path = write_jsonl(tmp_path / "many.jsonl", ROWS * 800)
    unpacked, _ = data(tiny_llama_dir, path, max_length=16)
    packed, _ = data(tiny_llama_dir, path, max_length=16, packing=True)
    rows = unpacked.datasets["train"].tokens
    expected = pack_reference([rows[i] for i in range(len(rows))], 16)
    got = packed.datasets["train"].tokens
    assert len(got) == len(expected) > 1000
    assert [got[i] for i in range(len(got))] == expected


def test_bad_instruction_files(tiny_llama_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    with pytest.raises(RecipeError, match=r"data.train: bad.jsonl line 1 needs 'prompt' and 'response'"):
        data(tiny_llama_dir, bad)[0].train_dataloader()
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RecipeError, match=r"data.train: broken.jsonl line 1 is not JSON"):
        data(tiny_llama_dir, tmp_path / "broken.jsonl")[0].train_dataloader()
    with pytest.raises(RecipeError, match=r"data.max_length"):
        InstructionData(train="x", max_length=1)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"limit": 0}, "data.limit"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"eval_batch_size": 0}, "data.eval_batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"seed": -1}, "data.seed"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(RecipeError) as info:
        InstructionData(train="x", **kwargs)
    assert info.value.key == key


def test_holding_out_every_conversation_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
    with pytest.raises(RecipeError, match=r"^data\.val_fraction: holding out 1 of 1 train rows"):
        InstructionData(train=str(path), val_fraction=0.1).conversations  # noqa: B018


def test_loaders_draw_nothing_from_the_global_rng(tiny_llama_dir, tmp_path):
    # A resumed run creates loader iterators at other moments than an uninterrupted one; if creating them
    # drew from the global RNG, the resumed run would get other dropout masks.
    import torch

    module = InstructionData(
        train=str(write_jsonl(tmp_path / "c.jsonl", ROWS * 4)), backbone=str(tiny_llama_dir)
    )
    module.setup("fit")
    for loader in (module.train_dataloader(), module.val_dataloader()):
        before = torch.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.get_rng_state(), before)
