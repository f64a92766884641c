"""Supervised fine-tuning (instruction tuning) of a decoder-only Hugging Face language model, and what every
causal-LM task shares (``CausalLMTask``; ``finetune.tasks.preference`` builds on it)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from finetune import runs
from finetune.backbones import Backbone
from finetune.backbones.base import KEY as BACKBONE_KEY
from finetune.backbones.layout import Layout, language_model_layout
from finetune.errors import RecipeError
from finetune.export import export_language_model
from finetune.optim import TokenNormalizedLoss
from finetune.paths import is_local_path, resolve_path
from finetune.strategies import Strategy
from finetune.tasks.base import FinetuneTask
from finetune.tasks.loss_terms import StepOutputs

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask")
ADAPTER_CONFIG = "adapter_config.json"  # what marks a peft adapters folder


class CausalLMTask(FinetuneTask):
    """What the tasks on a Hugging Face causal LM share (``SFTTask``, ``PreferenceTask``): the model and its
    layout, next-token logits, sample generations after each validation epoch, and the export.

    The backbone may also be a run folder or an adapters export of a causal LM: the model it stands for,
    adapters merged, is what loads (``causal_lm_backbone``).

    After each validation epoch (not the sanity check), ``write_samples`` greedily completes the first
    ``samples`` validation prompts of a datamodule that has ``sample_prompts(n)`` and ``tokenizer``
    (``InstructionData``, ``PreferenceData``) and appends them to ``<run>/samples.jsonl``.
    """

    teacher_kind = "causal_lm"

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "lora",
        samples: int = 3,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(causal_lm_backbone(backbone), strategy, **kwargs)
        self.samples = samples
        self.max_new_tokens = max_new_tokens

    def causal_lm_hparams(self) -> dict[str, Any]:
        """``base_hparams`` and this class's own arguments."""
        return self.base_hparams() | {"samples": self.samples, "max_new_tokens": self.max_new_tokens}

    def build_model(self) -> tuple[nn.Module, Layout]:
        model = self.load_backbone(self.strategy.load_options())
        return model, language_model_layout(model)

    def load_backbone(self, options: Mapping[str, Any]) -> nn.Module:
        return self.backbone.load_causal_lm(options)

    @override
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token logits."""
        return self.forward_features(batch, ())[0]

    def forward_features(
        self, batch: Mapping[str, torch.Tensor], names: tuple[str, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token logits and the named features (``pooled``, ``hidden.N``) of one forward pass."""
        from finetune.backbones.hf import hidden_features

        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        output = self.model(**inputs, use_cache=False, output_hidden_states=bool(names))
        return output.logits, hidden_features(output.hidden_states, inputs.get("attention_mask"), names)

    def write_samples(self) -> None:
        """Greedy completions of the first validation prompts, appended to ``<run>/samples.jsonl`` by rank 0;
        nothing during the sanity check, with ``samples`` 0, or for a datamodule without ``sample_prompts``.

        A sharded model generates on every process (each forward gathers weights from all of them, and every
        process generates the same tokens, so they stop together); an unsharded one on rank 0 alone.
        """
        from finetune.parallel.placement import is_sharded

        datamodule = self.datamodule()
        if (
            not self.samples
            or self.trainer.sanity_checking
            or not callable(getattr(datamodule, "sample_prompts", None))
            or not (self.trainer.is_global_zero or is_sharded(self))
        ):
            return
        with torch.no_grad():
            rows = [self._complete(datamodule.tokenizer, s) for s in datamodule.sample_prompts(self.samples)]
        if not self.trainer.is_global_zero:
            return
        path = runs.run_dir(self.trainer) / runs.SAMPLES
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        log.info("Wrote sample generations to %s", path)

    def _complete(self, tokenizer: Any, sample: dict[str, Any]) -> dict[str, Any]:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([sample["prompt_ids"]], device=self.device)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        text = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        row = {"epoch": self.current_epoch, "step": self.global_step, "prompt": sample["prompt"]}
        return row | {"reference": sample["reference"], "generation": text}

    def export(self, directory: Path, merge: bool = False) -> Path:
        """A Hugging Face folder (safetensors) with the tokenizer; adapters alone unless ``merge``."""
        return export_language_model(self, directory, merge)


class SFTTask(TokenNormalizedLoss, CausalLMTask):
    """Next-token loss on response tokens (the data sets every other label to -100).

    Under gradient accumulation the training loss is the mean over all response tokens of the optimizer
    step, not a mean of per-micro-batch means (``TokenNormalizedLoss``).

    Registered loss terms (``finetune.tasks.loss_terms``) see the full-length token logits with
    ``reduction="sum"`` and ``mask`` marking the positions whose next token is a response token; their
    sums are normalised together with the task loss.

    Logs ``train/loss``, ``val/loss`` (mean per response token) and ``val/perplexity``. After each
    validation epoch it greedily completes the first ``samples`` validation prompts of an ``InstructionData``
    datamodule and appends them to ``<run>/samples.jsonl``.

    Args:
        backbone: a Hugging Face causal LM: ``hf:ID``, a local folder, a full backbone spec, or a run folder
            or adapters export of a causal LM (its model with the adapters merged, see ``causal_lm_backbone``).
        strategy: what trains: ``lora`` (default), ``qlora``, ``full`` ... or a strategy object.
        samples: how many validation prompts to complete after each validation epoch (0: none).
        max_new_tokens: length limit of those completions.
        **kwargs: ``optimizer`` and ``lr_scheduler``, as ``FinetuneTask`` takes them.
    """

    epoch_metrics = ("val/loss", "val/perplexity")

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "lora",
        samples: int = 3,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, samples, max_new_tokens, **kwargs)
        self.val_nll = MeanMetric()
        self.save_hyperparameters(self.causal_lm_hparams())

    def token_losses(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the next-token losses over the batch's target tokens, and how many there are."""
        return _next_token_losses(self(batch), batch["labels"])

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, features = self.forward_features(batch, self.requested_features())
        loss_sum, tokens = _next_token_losses(logits, batch["labels"])
        mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
        mask[:, :-1] = batch["labels"][:, 1:] != -100  # position t predicts token t + 1
        outputs = StepOutputs(logits, batch, loss_sum, reduction="sum", mask=mask, features=features)
        total = self.total_loss(outputs, len(batch["input_ids"]), per=tokens)
        return self.token_loss(total, tokens)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Weight by response tokens, so val/loss is the mean over tokens and exp() of it the perplexity.
        loss_sum, tokens = self.token_losses(batch)
        self.val_nll.update(loss_sum / tokens.clamp(min=1), weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        nll = self.val_nll.compute()
        self.val_nll.reset()
        self.log("val/loss", nll, prog_bar=True)
        self.log("val/perplexity", nll.exp(), prog_bar=True)
        self.write_samples()


def _next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the next-token cross-entropies over target tokens (labels != -100), and their count."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss_sum, (targets != -100).sum()


def causal_lm_backbone(value: str | Backbone | Mapping[str, Any]) -> Backbone:
    """``value`` as a backbone that a causal LM loads from: run folders and adapters exports become the
    plain Hugging Face folder of their model with the adapters merged (the standard start of preference
    tuning: the SFT model is the base, and under ``lora``/``qlora`` the reference).

    - A run folder (``runs/<recipe>/version_N``, with ``config.yaml``) of a causal-LM task stands for
      ``<run>/export-merged``, what ``python -m finetune export <run> --merge`` writes; it is written from the
      run's best checkpoint (else its last) first when missing or older than that checkpoint.
    - An adapters export (``adapter_config.json``, no ``config.json``) stands for ``<folder>-merged``: its base
      model (``base_model_name_or_path``) with the adapters merged by peft, and the export's tokenizer.
    - Anything else (``hf:ID``, a model folder, a merged export) is returned as it is.
    """
    backbone = Backbone.of(value)
    if not is_local_path(backbone.name):
        return backbone
    path = resolve_path(backbone.name, BACKBONE_KEY)
    if (path / runs.CONFIG).is_file():
        target = path / f"{runs.EXPORT}-merged"
        if not _newer(target, runs.find_checkpoint(path)):
            _export_merged_run(path, target)
    elif (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        target = path.with_name(f"{path.name}-merged")
        if not _newer(target, path / ADAPTER_CONFIG):
            _merge_adapters_export(path, target)
    else:
        return backbone
    log.info("Backbone %s: the merged model in %s", backbone.name, target)
    return dataclasses.replace(backbone, name=str(target))


def _newer(target: Path, source: Path) -> bool:
    config = target / "config.json"
    return config.is_file() and config.stat().st_mtime >= source.stat().st_mtime


def _export_merged_run(run: Path, target: Path) -> None:
    task = runs.load_run(run)
    if not isinstance(task, CausalLMTask):
        raise RecipeError(BACKBONE_KEY, f"the run {run} trained a {type(task).__name__}, not a causal LM")
    task.export(target, merge=True)


def _merge_adapters_export(folder: Path, target: Path) -> None:
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    from finetune.export import write_atomically

    base = Backbone.of(PeftConfig.from_pretrained(str(folder)).base_model_name_or_path).load_causal_lm()
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(folder).save_pretrained(staging)

    write_atomically(target, write)
