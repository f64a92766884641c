"""The student as distillation sees it: a finetune task, or your own module with ``LossTermsMixin``.

Distillation needs of the student its classes (to check the teacher's), the image statistics its pixels
were normalised with (to re-normalise them for the teacher), the tokenizer of its batches, and for feature
matches the width of each feature and the feature itself in every training step. A finetune task knows its
backbone and computes the features its loss terms request in its own forward pass. Your module's network
(a timm or Hugging Face model) is read instead: its family gives the widths and image statistics, and
hooks on it (``FeatureTap``) keep the features of the training forward pass for the loss terms to read.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from finetune.backbones.base import LOADERS, PixelStatistics, check_feature
from finetune.backbones.hf import hidden_features
from finetune.distill.losses import KEY
from finetune.errors import RecipeError
from finetune.optim.network import network, network_family
from finetune.tasks.base import FinetuneTask
from finetune.tasks.loss_terms import LossContribution, LossTerm, StepOutputs

log = logging.getLogger(__name__)


class TaskStudent:
    """A finetune task: its backbone says it all, and it computes requested features itself."""

    def __init__(self, task: FinetuneTask) -> None:
        self.task = task
        self.family = task.loader.family
        self.labels = getattr(task, "labels", None) if task.teacher_kind != "causal_lm" else None

    def feature_width(self, name: str) -> int:
        check_feature(name, self.family, f"{KEY}.features")
        return self.task.loader.feature_width(self.task.model, name)

    def pixel_statistics(self) -> PixelStatistics | None:
        return self.task.backbone.pixel_statistics()

    def tokenizer(self, trainer: pl.Trainer) -> Any:
        """The tokenizer of the student's batches (text, causal LMs), or None (images)."""
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        if tokenizer is None and self.task.teacher_kind == "causal_lm":
            tokenizer = self.task.backbone.tokenizer()
        return tokenizer

    def feature_term(self, term: LossTerm) -> LossTerm:
        return term

    def release(self) -> None:
        """Nothing to undo: the task computes its features itself."""


class ModuleStudent:
    """Your ``LightningModule``: its network (``module``, default the child holding most parameters), found
    only when features or image statistics are needed; its ``labels`` and ``tokenizer`` when it has them."""

    def __init__(self, pl_module: pl.LightningModule, module: str | None) -> None:
        self.pl_module = pl_module
        self.module = module
        self.labels = getattr(pl_module, "labels", None)
        self.taps: list[FeatureTap] = []

    def network(self) -> tuple[nn.Module, str | None]:
        """The student's network and its family (``timm``, ``hf``, None for neither)."""
        _, found = network(self.pl_module, self.module, f"{KEY}.module")
        return found, network_family(found)

    def feature_width(self, name: str) -> int:
        found, family = self._family_network()
        check_feature(name, family, f"{KEY}.features")
        return LOADERS.get(family).feature_width(found, name)

    def pixel_statistics(self) -> PixelStatistics | None:
        """A timm network's own (its ``pretrained_cfg``); None for others, whose statistics are unknown."""
        found, family = self.network()
        if family != "timm":
            log.warning(
                "Distillation: the statistics the student's pixels were normalised with are unknown (%s is "
                "not a timm model); the teacher reads them as they are",
                type(found).__name__,
            )
            return None
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(found)
        return PixelStatistics(tuple(config["mean"]), tuple(config["std"]), tuple(config["input_size"][1:]))

    def tokenizer(self, trainer: pl.Trainer) -> Any:
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        return tokenizer if tokenizer is not None else getattr(self.pl_module, "tokenizer", None)

    def feature_term(self, term: LossTerm) -> LossTerm:
        """``term`` reading the student's features from hooks on the network."""
        found, family = self._family_network()
        tap = FeatureTap(found, family, term.features)
        self.taps.append(tap)
        return TappedTerm(term, tap)

    def release(self) -> None:
        for tap in self.taps:
            tap.remove()
        self.taps = []

    def _family_network(self) -> tuple[nn.Module, str]:
        found, family = self.network()
        if family is None:
            raise RecipeError(
                f"{KEY}.features",
                f"feature matches read a timm or Hugging Face network; {type(found).__name__} is neither "
                "(name the module holding one, or distil logits only)",
            )
        return found, family


def student_of(pl_module: pl.LightningModule, module: str | None) -> TaskStudent | ModuleStudent:
    return TaskStudent(pl_module) if isinstance(pl_module, FinetuneTask) else ModuleStudent(pl_module, module)


class FeatureTap:
    """Keeps the named features of the last forward pass of ``network`` run with gradients (training), by
    hooks: timm's ``pooled`` is its classifier's input (``forward_head(..., pre_logits=True)``); Hugging
    Face's come from ``output_hidden_states``, asked for in that pass (``finetune.backbones.hf.hidden_features``,
    as for finetune's tasks)."""

    def __init__(self, network: nn.Module, family: str, names: tuple[str, ...]) -> None:
        self.names = names
        self.kept: dict[str, torch.Tensor] | None = None
        if family == "timm":
            self.handles = [network.get_classifier().register_forward_pre_hook(self._keep_pooled)]
        else:
            self.signature = inspect.signature(network.forward)
            self.handles = [
                network.register_forward_pre_hook(self._ask_hidden, with_kwargs=True),
                network.register_forward_hook(self._keep_hidden, with_kwargs=True),
            ]

    def read(self) -> dict[str, torch.Tensor]:
        """The features of the step's forward pass (each pass is read once)."""
        if self.kept is None:
            raise RecipeError(
                KEY,
                "the student's network ran no training forward pass before total_loss; call it in "
                "training_step (or name the module that runs)",
            )
        kept, self.kept = self.kept, None
        return kept

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _keep_pooled(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():
            self.kept = {"pooled": args[0]}

    def _ask_hidden(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not torch.is_grad_enabled():
            return None
        return args, kwargs | {"output_hidden_states": True}

    def _keep_hidden(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not torch.is_grad_enabled():
            return
        hidden = getattr(output, "hidden_states", None)
        if hidden is None:
            raise RecipeError(
                f"{KEY}.features", "the student's network returned no hidden_states; call it with return_dict"
            )
        mask = self.signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        self.kept = hidden_features(hidden, mask, self.names)


class TappedTerm:
    """A loss term whose student features come from a ``FeatureTap`` rather than from the module's step."""

    features: tuple[str, ...] = ()

    def __init__(self, term: LossTerm, tap: FeatureTap) -> None:
        self.term = term
        self.tap = tap
        self.name = term.name

    def __call__(self, outputs: StepOutputs) -> LossContribution:
        return self.term(replace(outputs, features=self.tap.read()))
