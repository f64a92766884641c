"""Preference tuning (DPO, IPO, SimPO, ORPO) of a Hugging Face causal LM on chosen/rejected pairs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from finetune.backbones import Backbone
from finetune.batch import INDEX
from finetune.data.conversations import IGNORE
from finetune.dtypes import DTYPES, DtypeName
from finetune.errors import RecipeError, require
from finetune.strategies import AdapterStrategy, Strategy
from finetune.tasks.base import Monitor
from finetune.tasks.loss_terms import StepOutputs
from finetune.tasks.preference_losses import LOSSES, PreferenceLoss
from finetune.tasks.sft import CausalLMTask

log = logging.getLogger(__name__)

ReferenceKind = Literal["none", "adapters", "copy"]
REFERENCES: dict[ReferenceKind, str] = {
    "none": "none (reference-free loss)",
    "adapters": "the model with its adapters disabled",
    "copy": "a frozen copy of the starting model",
}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the sum of the log-probabilities of its target tokens (labels != -100; position ``t``
    predicts token ``t + 1``) and how many there are, ``(N,)`` each; computed in float32."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - logits.logsumexp(-1)) * mask
    return token_logps.sum(-1), mask.sum(-1)


@dataclass
class FrozenReference:
    """The reference model under ``full``/``partial``: frozen, in eval mode. Held in a plain object, not as a
    submodule, so it is in no optimizer, checkpoint or ``parameters()`` count of the task."""

    model: nn.Module

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype | None) -> FrozenReference:
        """A copy of ``model`` as it is now (in ``dtype`` when given)."""
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        return cls(reference.to(dtype) if dtype is not None else reference)

    def bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule of ``model`` in eval mode inside the block (dropout off), as each was after it."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class PreferenceTask(CausalLMTask):
    """Preference tuning of a causal LM: each batch's chosen and rejected responses (``PreferenceData``)
    go through the model in one forward pass, and ``loss`` compares their log-probabilities
    (``finetune.tasks.preference_losses``: formulas, signs and defaults).

    The reference model (``dpo``, ``ipo``; ``simpo`` and ``orpo`` load none) is the starting model, never a
    second copy under adapters: under ``lora``/``qlora`` it is the same model with its adapters disabled
    (under ``no_grad``); under ``full``/``partial`` a frozen copy of the model as a trainer's ``fit`` or
    ``validate`` builds it (before a checkpoint's weights are restored), in ``reference_dtype`` when given,
    outside the optimizer, the checkpoints and the task's parameters. With ``precompute_reference`` the
    reference's log-probs of every train and val pair are computed once when fitting starts (again on
    resume) and the copy is then dropped. The reference forward runs in eval mode.
    ``memory_rows()`` gives the copy's bytes to the run plan.

    Logged per training step (``train/``) and per validation epoch (``val/``, means over pairs): ``loss``,
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/margin`` (chosen - rejected), ``rewards/accuracy`` (the
    share of pairs whose chosen reward is higher), ``logps/chosen`` and ``logps/rejected`` (the log-probs the
    loss reads: sums over response tokens, or per-token means for ``ipo``, ``simpo``, ``orpo``). The best
    checkpoint has the lowest ``val/loss``; a plateau schedule may watch ``val/rewards/accuracy`` instead.
    Sample generations as ``SFTTask`` writes them.

    Start from an SFT run: ``backbone: runs/sft/version_0`` (or its adapters or merged export) loads that model
    with the SFT adapters merged (``finetune.tasks.sft.causal_lm_backbone``), and new adapters train on it:
    the reference is the SFT model, the standard DPO setup.

    Args:
        backbone: a Hugging Face causal LM (``hf:ID``, a local folder, a backbone spec), or a run folder or
            export of one.
        strategy: what trains: ``lora`` (default), ``qlora``, ``full``, ``partial`` ... or a strategy object.
        loss: ``dpo``, ``ipo``, ``simpo`` or ``orpo``.
        beta: the loss's beta (IPO's tau, ORPO's lambda); default per loss: dpo 0.1, ipo 0.1, simpo 2.0,
            orpo 0.1.
        label_smoothing: ``dpo`` and ``simpo``: the probability that a preference label is flipped
            (conservative DPO); default 0.
        gamma: ``simpo``: the target reward margin; default 1.0.
        reference_dtype: the frozen copy's dtype (``full``/``partial``): ``bfloat16`` halves its memory;
            default: the model's.
        precompute_reference: compute the reference log-probs once per pair when fitting starts, then drop the
            frozen copy (or skip the adapter-disabled forward in each step). Needs ``PreferenceData``.
        disable_dropout: set every dropout module's probability to 0 (as TRL does), so that the policy and
            reference log-probs of the starting model agree.
        samples: how many validation prompts to complete after each validation epoch (0: none).
        max_new_tokens: length limit of those completions.
        **kwargs: ``optimizer`` and ``lr_scheduler``, as ``FinetuneTask`` takes them.
    """

    monitor = Monitor("val/loss", "min")
    epoch_metrics = ("val/loss", "val/rewards/accuracy", "val/rewards/margin")
    teacher_kind = None

    def __init__(
        self,
        backbone: str | Backbone,
        strategy: str | Strategy = "lora",
        loss: str = "dpo",
        beta: float | None = None,
        label_smoothing: float | None = None,
        gamma: float | None = None,
        reference_dtype: DtypeName | None = None,
        precompute_reference: bool = False,
        disable_dropout: bool = True,
        samples: int = 3,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, strategy, samples, max_new_tokens, **kwargs)
        self.loss_spec = LOSSES.get(loss)
        self.hyper = _hyper_parameters(self.loss_spec, beta, label_smoothing=label_smoothing, gamma=gamma)
        self.reference_kind: ReferenceKind = (
            "none"
            if not self.loss_spec.reference
            else "adapters"
            if isinstance(self.strategy, AdapterStrategy)
            else "copy"
        )
        require(
            reference_dtype is None or self.reference_kind == "copy",
            "model.reference_dtype",
            f"applies to a frozen reference copy (full or partial strategies with dpo or ipo); the reference "
            f"here is {REFERENCES[self.reference_kind]}: drop it",
        )
        require(
            not precompute_reference or self.reference_kind != "none",
            "model.precompute_reference",
            f"{loss} uses no reference model: drop it",
        )
        self.reference_dtype = reference_dtype
        self.precompute_reference = precompute_reference
        self.disable_dropout = disable_dropout
        self.reference: FrozenReference | None = None
        self.precomputed: dict[str, torch.Tensor] = {}  # split -> (rows, 2) reference log-probs
        self.save_hyperparameters(
            self.causal_lm_hparams()
            | {
                "loss": loss,
                "beta": beta,
                "label_smoothing": label_smoothing,
                "gamma": gamma,
                "reference_dtype": reference_dtype,
                "precompute_reference": precompute_reference,
                "disable_dropout": disable_dropout,
            }
        )

    # -- the model and its reference ---------------------------------------------------------------------

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.disable_dropout:
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        if self.reference_kind == "copy" and self._running("fit", "validate"):
            # Built before a resumed run's weights are restored: the copy is the starting model.
            dtype = DTYPES[self.reference_dtype] if self.reference_dtype else None
            self.reference = FrozenReference.of(self.model, dtype)

    def _running(self, *stages: str) -> bool:
        """Whether a trainer runs this task for one of ``stages`` (``fit``, ``validate`` ...)."""
        return self._trainer is not None and self.trainer.state.fn in stages

    @override
    def on_fit_start(self) -> None:
        self._place_reference()
        if self.precompute_reference:
            self.precomputed = self._precompute()
            self.reference = None  # its log-probs are all in the table now

    @override
    def on_validation_start(self) -> None:
        self._place_reference()

    def _place_reference(self) -> None:
        if self.reference is not None:
            self.reference.model.to(self.device)

    @override
    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        if stage == "fit":
            self.precomputed = {}  # by row of this fit's data; the copy stays for later validation

    @override
    def memory_rows(self) -> list[tuple[str, int]]:
        if self.reference_kind != "copy" or self.model is None:
            return []
        if self.reference is not None:
            size = self.reference.bytes()
        else:  # not built yet, or dropped after precomputing: what it takes while held
            dtype = DTYPES[self.reference_dtype] if self.reference_dtype else None
            tensors = [*self.model.parameters(), *self.model.buffers()]
            size = sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize) for t in tensors)
        held = (
            "until its log-probs are precomputed" if self.precompute_reference else "frozen, on every device"
        )
        return [(f"reference model ({held})", size)]

    @override
    def describe_task(self) -> str:
        return f"{super().describe_task()}; loss {self.loss_spec.name}, reference: {REFERENCES[self.reference_kind]}"

    # -- log-probs ---------------------------------------------------------------------------------------

    def pair_logps(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and rejected responses' log-probs (``(B,)`` each) out of a ``2B``-row batch's logits,
        summed over response tokens or, for length-normalised losses, averaged."""
        sums, counts = sequence_logps(logits, labels)
        logps = sums / counts.clamp(min=1) if self.loss_spec.length_normalised else sums
        chosen, rejected = logps.chunk(2)
        return chosen, rejected

    @torch.no_grad()
    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference model's ``pair_logps`` for ``batch``, computed now (not from the precomputed table)."""
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        if self.reference_kind == "adapters":
            from finetune.strategies.adapters import adapters_disabled

            with adapters_disabled(self.model), eval_mode(self.model):
                logits = self(batch)
        elif self.reference is not None:
            logits = self.reference.model(**inputs, use_cache=False).logits
        else:
            raise RecipeError(
                "model.precompute_reference",
                "the reference copy exists only under a trainer's fit or validate, and is dropped once "
                "precomputed: validate within fit, or set precompute_reference false to validate on its own",
            )
        return self.pair_logps(logits, batch["labels"])

    def _reference(self, batch: Mapping[str, torch.Tensor], split: str) -> tuple[torch.Tensor, ...]:
        if self.reference_kind == "none":
            return ()
        if self.precomputed:
            table = self.precomputed[split][batch[INDEX].cpu()].to(self.device)
            return table[:, 0], table[:, 1]
        return self.reference_logps(batch)

    def _precompute(self) -> dict[str, torch.Tensor]:
        """The reference log-probs of every train and val pair, by row, on the CPU."""
        from finetune.data.preferences import PreferenceData

        datamodule = self.datamodule()
        if not isinstance(datamodule, PreferenceData):
            raise RecipeError(
                "model.precompute_reference", "needs PreferenceData (batches with each pair's row number)"
            )
        tables = {}
        for split, dataset in datamodule.datasets.items():
            table = torch.zeros(len(dataset), 2)
            for batch in datamodule.eval_loader(dataset):
                batch = {key: value.to(self.device) for key, value in batch.items()}
                table[batch[INDEX].cpu()] = torch.stack(self.reference_logps(batch), dim=-1).float().cpu()
            tables[split] = table
        log.info(
            "Precomputed the reference log-probs of %s pairs",
            " + ".join(str(len(t)) for t in tables.values()),
        )
        return tables

    # -- steps -------------------------------------------------------------------------------------------

    def pair_losses(
        self, batch: Mapping[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits of one forward pass over the batch's pairs, and the metrics logged (means over the
        pairs; ``loss`` is the training loss)."""
        logits = self(batch)
        chosen, rejected = self.pair_logps(logits, batch["labels"])
        pairs = self.loss_spec.function(chosen, rejected, *self._reference(batch, split), **self.hyper)
        metrics = {
            "loss": pairs.loss.mean(),
            "rewards/chosen": pairs.chosen_rewards.mean(),
            "rewards/rejected": pairs.rejected_rewards.mean(),
            "rewards/margin": (pairs.chosen_rewards - pairs.rejected_rewards).mean(),
            "rewards/accuracy": (pairs.chosen_rewards > pairs.rejected_rewards).float().mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        return logits, metrics

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, metrics = self.pair_losses(batch, "train")
        pairs = len(batch[INDEX])
        loss = metrics.pop("loss")
        self.log_dict({f"train/{name}": value.detach() for name, value in metrics.items()}, batch_size=pairs)
        return self.total_loss(StepOutputs(logits, batch, loss), batch_size=pairs)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, metrics = self.pair_losses(batch, "val")
        shown = {"loss", "rewards/accuracy"}
        for name, value in metrics.items():
            self.log(
                f"val/{name}", value, batch_size=len(batch[INDEX]), sync_dist=True, prog_bar=name in shown
            )

    @override
    def on_validation_epoch_end(self) -> None:
        self.write_samples()


def _hyper_parameters(spec: PreferenceLoss, beta: float | None, **given: float | None) -> dict[str, float]:
    """The loss's keyword arguments: ``beta`` and its options, defaults filled in; an option the loss does
    not take raises."""
    options = dict(spec.options)
    for name, value in given.items():
        require(
            value is None or name in options,
            f"model.{name}",
            f"{spec.name} takes no {name} (only {', '.join(['beta', *options])}): drop it",
        )
    values = {"beta": spec.beta if beta is None else beta} | {
        name: default if given.get(name) is None else given[name] for name, default in options.items()
    }
    require(values["beta"] > 0, "model.beta", f"must be above 0, got {values['beta']}")
    smoothing = values.get("label_smoothing", 0.0)
    require(0 <= smoothing < 0.5, "model.label_smoothing", f"must be in [0, 0.5), got {smoothing}")
    return values
