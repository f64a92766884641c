"""Weight averaging (EMA) of the trained weights only: validated, checkpointed and exported in their place."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.optim.swa_utils import AveragedModel
from typing_extensions import override

from finetune.errors import require

KEY = "trainer.callbacks.EMA"
# The checkpoint entry holding the training weights (the state_dict holds the averaged ones) and the count.
CHECKPOINT_KEY = "ema"


class EMA(EMAWeightAveraging):
    """An exponential moving average of the trained weights, used wherever the run's result is read.

    Lightning's ``EMAWeightAveraging`` averages a copy of the whole module; this one averages only the
    parameters that train (``requires_grad`` or held by the optimizer when fit starts: a LoRA run averages its
    adapters and the head, not the frozen base; the blocks ``GradualUnfreezing`` opens later are included)
    and, with ``use_buffers``, the floating-point buffers (BatchNorm statistics). The copy costs the memory of
    those alone, made when fit starts on the model's device and in its dtype; frozen and quantised weights
    are never copied or rounded.

    After each optimizer step: ``average = decay * average + (1 - decay) * weights`` (the first update copies
    the weights). Validation runs on the average (so checkpoint selection and early stopping judge it); each
    checkpoint's ``state_dict`` holds the average, and the training weights go under ``checkpoint["ema"]``,
    from where a resumed run takes them back. So the best checkpoint, the export made from it, ``validate`` /
    ``test`` / ``predict`` from a checkpoint and ``load_run`` all read the averaged weights; when training ends
    the module itself holds the average.

    Works on one device and under DDP; fails in ``setup`` under DeepSpeed, FSDP and ``fsdp2``, which keep the
    weights in checkpoints of their own.

    Args:
        decay: weight of the old average at each update, in ``[0, 1)``; ``1 / (1 - decay)`` steps is about
            the span averaged (0.999: the last thousand steps).
        update_every_n_steps: update after every n-th optimizer step.
        update_starting_at_step: first optimizer step (0-based) that updates; default the first.
        update_starting_at_epoch: also update at the end of each epoch from this one on; default never.
        use_buffers: average floating-point buffers too (otherwise the training ones are used throughout).
        device: where the average lives (``"cpu"`` saves accelerator memory); default the model's device.

    Example::

        trainer = Trainer(callbacks=[EMA(decay=0.999)])
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        use_buffers: bool = True,
        device: str | None = None,
    ) -> None:
        require(0 <= decay < 1, f"{KEY}.decay", f"must be in [0, 1) (1 never moves), got {decay}")
        require(
            update_every_n_steps >= 1,
            f"{KEY}.update_every_n_steps",
            f"must be 1 or more, got {update_every_n_steps}",
        )
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
            update_starting_at_epoch=update_starting_at_epoch,
        )
        self.decay = decay
        self.names: list[str] = []  # what is averaged, by name in the module: parameters, then buffers
        self._resumed: dict[str, Any] | None = None  # the EMA entry of the checkpoint a fit resumes from

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Those strategies (DeepSpeed, FSDP, fsdp2) write the weights in their own checkpoint format, not the
        # state_dict this callback puts the average in, and restore them after fit has started.
        require(
            stage != "fit" or not trainer.strategy.restore_checkpoint_after_setup,
            "trainer.strategy",
            f"EMA works on one device or under ddp, not {type(trainer.strategy).__name__}",
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the average, now that the strategy has placed the model and built the optimizers: a copy of
        the weights (when resuming: of the checkpoint's average, which the module has loaded; the module then
        takes back the training weights the checkpoint keeps)."""
        in_optimizers = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
        self.names = averaged_names(pl_module, in_optimizers, self._use_buffers)
        require(bool(self.names), KEY, f"{type(pl_module).__name__} has no trainable parameters to average")
        device = self._device or pl_module.device
        self._average_model = _Average(pl_module, self.names, device, self._use_buffers, **self._kwargs)
        if self._resumed is not None:
            weights = self._resumed["weights"]
            with torch.no_grad():
                for name, live in zip(self.names, _tensors(_Named(pl_module, self.names))):
                    live.copy_(weights[name])
                self._average_model.n_averaged.copy_(self._resumed["n_averaged"])
            self._resumed = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # The module holds the average now; a later validate/test on this trainer must not swap anything in.
        if stage == "fit":
            self._average_model = None

    @override
    def _swap_models(self, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for average, live in self._pairs(pl_module):
                kept = average.clone()
                average.copy_(live)
                live.copy_(kept)

    @override
    def _copy_average_to_current(self, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            for average, live in self._pairs(pl_module):
                live.copy_(average)

    def _pairs(self, pl_module: pl.LightningModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(_tensors(self._average_model.module), _tensors(_Named(pl_module, self.names)))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The ``state_dict`` gets the average (under every name a tied weight has); the training weights and
        the update count go under ``checkpoint["ema"]``."""
        if self._average_model is None:
            return  # outside fit: the module's weights are the result already
        averages = list(_tensors(self._average_model.module))
        lives = list(_tensors(_Named(pl_module, self.names)))
        average_of = {id(live): average for live, average in zip(lives, averages)}
        state = checkpoint["state_dict"]
        for name, tensor in _all_named_tensors(pl_module):
            if id(tensor) in average_of and name in state:
                state[name] = average_of[id(tensor)].detach()
        checkpoint[CHECKPOINT_KEY] = {
            "weights": {name: live.detach() for name, live in zip(self.names, lives)},
            "n_averaged": self._average_model.n_averaged,
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming fit: keep the checkpoint's training weights for ``on_fit_start`` (restoring comes before it).
        Evaluating from a checkpoint reads its state_dict, the average; a checkpoint without EMA starts afresh."""
        if trainer.state.fn == TrainerFn.FITTING:
            self._resumed = checkpoint.get(CHECKPOINT_KEY)


def averaged_names(module: nn.Module, in_optimizers: set[int], use_buffers: bool) -> list[str]:
    """The names of what EMA averages in ``module``: the parameters that train (``requires_grad``, or held by
    an optimizer, ``in_optimizers`` by ``id``: a block ``GradualUnfreezing`` keeps closed), then the
    floating-point buffers."""
    names = [name for name, p in module.named_parameters() if p.requires_grad or id(p) in in_optimizers]
    if use_buffers:
        names += [name for name, b in module.named_buffers() if torch.is_floating_point(b)]
    return names


class _Named(nn.Module):
    """The tensors of ``module`` named ``names`` (parameters first), gathered as one module: the same tensor
    objects, so ``AveragedModel`` copies just these and averages them in its order.

    Made anew for each use: moving a module to a device replaces its buffer objects.
    """

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        parameters = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        self.weights = nn.ParameterList([parameters[n] for n in names if n in parameters])
        for i, name in enumerate(n for n in names if n not in parameters):
            self.register_buffer(f"buffer_{i}", buffers[name])


class _Average(AveragedModel):
    """``AveragedModel`` of some named tensors of a module; ``update_parameters`` takes the module itself."""

    def __init__(
        self, module: nn.Module, names: list[str], device: Any, use_buffers: bool, **kwargs: Any
    ) -> None:
        super().__init__(_Named(module, names), device=device, use_buffers=use_buffers, **kwargs)
        self.names = names

    @override
    def update_parameters(self, model: nn.Module) -> None:
        super().update_parameters(_Named(model, self.names))


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    return itertools.chain(module.parameters(), module.buffers())


def _all_named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every name of every parameter and buffer, tied ones under each of their names."""
    return itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
