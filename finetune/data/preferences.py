"""Preference pairs for causal LMs (DPO and kin): JSONL of a prompt with a chosen and a rejected response.

Each JSONL line is one of:

- ``{"prompt": str, "chosen": str, "rejected": str}``: one user turn and two assistant replies;
- ``{"chosen": [messages], "rejected": [messages]}``: two conversations sharing their first messages, the
  prompt (everything up to the last message of each counts: the last messages are always the responses);
- ``{"prompt": [messages], "chosen": [messages] | str, "rejected": [messages] | str}``.

Messages are ``{"role", "content"}`` as in ``finetune.data.conversations``; a response's messages start
with an assistant turn, and every assistant turn in a response is trained on (others in it are not).
Responses may be equal, not empty. Rows are rendered like instructions (the tokenizer's chat template when
it has one, else the plain template) and tokenised with the loss on the responses only.

Truncation keeps the prompt/response boundary: a prompt longer than ``max_prompt_length`` tokens loses its
beginning (its BOS token stays), then each response is cut at the end to fit ``max_length`` with its
prompt. Rows are converted once into memory-mapped Arrow and tokenised by a cached ``Dataset.map``, as
instructions are.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from finetune.backbones.base import Backbone
from finetune.batch import INDEX
from finetune.data.arrow import cached_map, fingerprint, reopened
from finetune.data.conversations import IGNORE, JsonlChunks, Segment, segments, tokenize
from finetune.data.instructions import JsonlTokenData, TokenRows
from finetune.errors import RecipeError, require

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class PreferenceChunks(JsonlChunks):
    """The pairs of a JSONL file as DataFrames of ``prompt``, ``chosen`` and ``rejected`` message lists."""

    noun = "preference pairs"

    def row(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or not all(side in value for side in SIDES):
            raise RecipeError(
                self.key,
                f"{where} needs 'chosen' and 'rejected' (and 'prompt', unless both are message lists "
                "that share their first messages)",
            )
        if "prompt" in value:
            prompt = self._messages(value["prompt"], "user", f"{where} 'prompt'")
            pair = [self._messages(value[side], "assistant", f"{where} {side!r}") for side in SIDES]
        else:
            prompt, pair = self._shared_prompt(value, where)
        if not prompt:
            raise RecipeError(self.key, f"{where} has an empty prompt")
        for side, messages in zip(SIDES, pair):
            self._check_response(messages, f"{where} {side!r}")
        return {"prompt": prompt, "chosen": pair[0], "rejected": pair[1]}

    def _messages(self, value: Any, role: str, where: str) -> Messages:
        """A string as one ``role`` message, or a checked list of messages."""
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        if not isinstance(value, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and "content" in m for m in value
        ):
            raise RecipeError(
                self.key,
                f"{where} must be a string or a list of {{'role', 'content'}} messages (roles {ROLES})",
            )
        return [{"role": m["role"], "content": str(m["content"])} for m in value]

    def _shared_prompt(self, value: dict[str, Any], where: str) -> tuple[Messages, list[Messages]]:
        """Split two conversations into their shared first messages and the two responses."""
        chosen, rejected = (self._messages(value[side], "assistant", f"{where} {side!r}") for side in SIDES)
        shared = 0
        limit = min(len(chosen), len(rejected)) - 1  # the last messages are always the responses
        while shared < limit and chosen[shared] == rejected[shared]:
            shared += 1
        return chosen[:shared], [chosen[shared:], rejected[shared:]]

    def _check_response(self, messages: Messages, where: str) -> None:
        if not messages or messages[0]["role"] != "assistant" or messages[-1]["role"] != "assistant":
            raise RecipeError(
                self.key, f"{where} must start and end with an assistant message after the shared prompt"
            )
        if any(m["role"] == "assistant" and not m["content"].strip() for m in messages):
            raise RecipeError(self.key, f"{where} has an empty response")


def prompt_and_response(
    tokenizer: Any, prompt: Messages, response: Messages
) -> tuple[list[Segment], list[Segment]]:
    """The rendered conversation ``prompt + response`` cut where the response begins: the prompt's segments
    (replies in it are not trained on) and the response's."""
    parts = segments(tokenizer, prompt + response)
    replies = [i for i, (_, is_response) in enumerate(parts) if is_response]
    first = replies[sum(m["role"] == "assistant" for m in prompt)]
    return [(text, False) for text, _ in parts[:first]], parts[first:]


def truncated_prompt(ids: list[int], max_prompt_length: int, bos: int | None) -> list[int]:
    """The last ``max_prompt_length`` tokens of a prompt, its leading BOS kept."""
    if len(ids) <= max_prompt_length:
        return ids
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (max_prompt_length - len(head)) :]


def tokenize_pairs(
    prompts: list[Messages],
    chosen: list[Messages],
    rejected: list[Messages],
    *,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
) -> dict[str, list[list[int]]]:
    """Batched ``map`` step: ``{side}_input_ids`` and ``{side}_labels`` (-100 on the prompt) for both sides
    of each pair, truncated as the module docstring says; a pair whose response keeps no trained token
    within the limits is dropped."""
    columns: dict[str, list[list[int]]] = {
        f"{side}_{name}": [] for side in SIDES for name in ("input_ids", "labels")
    }
    for prompt, *responses in zip(prompts, chosen, rejected):
        rows = {}
        for side, response in zip(SIDES, responses):
            prompt_parts, response_parts = prompt_and_response(tokenizer, prompt, response)
            prompt_ids = tokenize(tokenizer, prompt_parts, None)["input_ids"]
            prompt_ids = truncated_prompt(prompt_ids, max_prompt_length, tokenizer.bos_token_id)
            tail = tokenize(tokenizer, response_parts, max_length - len(prompt_ids), start=False)
            rows[side] = (prompt_ids + tail["input_ids"], [IGNORE] * len(prompt_ids) + tail["labels"])
        if all(any(label != IGNORE for label in labels) for _, labels in rows.values()):
            for side, (ids, labels) in rows.items():
                columns[f"{side}_input_ids"].append(ids)
                columns[f"{side}_labels"].append(labels)
    return columns


class PairRows(TokenRows):
    """Tokenised pairs in a memory-mapped Arrow file. ``collate`` stacks a batch of ``B`` pairs into one batch
    of ``2B`` sequences, the chosen ones first, right-padded together (id ``pad_id``, label -100, mask 0),
    with each pair's row number in ``index`` (``B``)."""

    @override
    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        return [row | {INDEX: index} for row, index in zip(super().__getitems__(indices), indices)]

    @override
    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [
            {"input_ids": item[f"{side}_input_ids"], "labels": item[f"{side}_labels"]}
            for side in SIDES
            for item in items
        ]
        return self.padding(sequences) | {INDEX: torch.tensor([item[INDEX] for item in items])}


class PreferenceData(JsonlTokenData):
    """Preference pairs (JSONL, formats in the module docstring) for ``PreferenceTask``.

    Batches of ``B`` pairs hold ``input_ids``, ``attention_mask`` and ``labels`` of ``2B`` sequences (the
    ``B`` chosen, then the ``B`` rejected; labels -100 except on response tokens) and ``index``, each pair's
    row in its split. ``sample_prompts(n)`` gives validation prompts (the chosen response is the reference)
    for sample generations.
    """

    reader = PreferenceChunks

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        val_fraction: float = 0.1,
        limit: int | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        seed: int = 42,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        backbone: str | Backbone | None = None,
    ) -> None:
        """
        Args:
            train: JSONL file of preference pairs (``pkg://package/path`` works too).
            val: JSONL file for validation; default: ``val_fraction`` of ``train``.
            val_fraction: share of ``train`` held out for validation when ``val`` is not given.
            limit: use a random sample of this many train pairs.
            max_length: the most tokens of a prompt and one response together.
            max_prompt_length: the most prompt tokens (longer prompts lose their beginning); below
                ``max_length``, so every response keeps a token.
            seed: seed for ``limit``, the held-out split and the shuffling order.
            batch_size: training batch size, in pairs (each is two sequences).
            eval_batch_size: validation batch size; default ``batch_size``.
            num_workers: data loading worker processes; default: 0 for fewer than 10,000 rows, else
                min(4, CPUs per process - 1).
            num_proc: processes tokenising each split (default: this one).
            cache_dir: folder for the converted pairs and their tokens; default: ``$HF_DATASETS_CACHE/finetune``.
            backbone: the model's backbone (for its tokenizer); set from ``model.backbone``.
        """
        super().__init__(
            train,
            val,
            val_fraction,
            limit,
            max_length,
            num_proc,
            backbone=backbone,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
        )
        require(
            0 < max_prompt_length < max_length,
            "data.max_prompt_length",
            f"must be at least 1 and below max_length ({max_length}), got {max_prompt_length}",
        )
        self.max_prompt_length = max_prompt_length

    @property
    def pairs(self) -> dict[str, datasets.Dataset]:
        """The train and val pairs (``prompt``, ``chosen``, ``rejected`` message lists), memory-mapped."""
        return {split: rows.rows for split, rows in self._splits.items()}

    @override
    def _tokens(self, split: str) -> datasets.Dataset:
        rows = self._splits[split]
        limits = (self.max_length, self.max_prompt_length)
        tokens = cached_map(
            reopened(rows.rows),  # the pairs' pages are let go once tokenised
            tokenize_pairs,
            folder=self.cache / "tokens",
            key=fingerprint(rows.fingerprint, self.tokenizer_fingerprint, limits, "preference tokens"),
            num_proc=self.num_proc,
            input_columns=["prompt", *SIDES],
            remove_columns=rows.columns(),
            features=_pair_features(),
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": limits[0], "max_prompt_length": limits[1]},
            desc=f"tokenizing {split}",
        )
        self._kept(split, len(rows), tokens)
        return tokens

    @override
    def _token_rows(self, tokens: datasets.Dataset, pad_id: int) -> PairRows:
        return PairRows(tokens, pad_id)

    @override
    def sample_prompts(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` validation prompts (text and ids, truncated as for training); the reference is the
        chosen response's text."""
        val = self.pairs["val"]
        samples = []
        for row in val.select(range(min(n, len(val)))):
            parts, _ = prompt_and_response(self.tokenizer, row["prompt"], row["chosen"])
            ids = tokenize(self.tokenizer, parts, None)["input_ids"]
            ids = truncated_prompt(ids, self.max_prompt_length, self.tokenizer.bos_token_id)
            reference = "".join(m["content"] for m in row["chosen"] if m["role"] == "assistant")
            samples.append(
                {"prompt": "".join(t for t, _ in parts), "prompt_ids": ids, "reference": reference}
            )
        return samples


def _pair_features() -> Any:
    from datasets import Features, List, Value

    return Features(
        {f"{side}_{name}": List(Value("int32")) for side in SIDES for name in ("input_ids", "labels")}
    )
