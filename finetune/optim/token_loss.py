"""Token-level loss normalisation under gradient accumulation (and DDP).

A token-level loss (causal LM, token classification) should be the mean over *all* target tokens of an
optimizer step. Lightning's loop instead averages each micro-batch's mean: with variable-length sequences,
batch 1 x accumulation 32 then differs from batch 32 x 1. ``TokenNormalizedLoss`` fixes it.

Contract, for any LightningModule with automatic optimization:

1. Mix it in before the Lightning base: ``class SFTTask(TokenNormalizedLoss, FinetuneTask)``.
2. In ``training_step`` return ``self.token_loss(loss_sum, num_tokens)``: ``loss_sum`` is the *sum* of
   the per-token losses of the micro-batch, ``num_tokens`` how many target tokens it has (labels != -100).
   Log the per-token mean (``loss_sum / num_tokens``) yourself for display.
3. If the module overrides ``on_before_optimizer_step``, it calls ``super().on_before_optimizer_step(...)``.

Before each optimizer step (Lightning's ``on_before_optimizer_step``: after AMP unscaling, before
gradient clipping) the gradients are multiplied by ``accumulate_grad_batches * world_size / N``, where
``N`` is the step's token count summed over the accumulated micro-batches and over all DDP ranks. That
undoes Lightning's division by the accumulation factor and DDP's average over ranks, leaving
``sum of token-loss gradients / N``. Validation and test steps are untouched (use your own mean there).
"""

from __future__ import annotations

import logging

import torch
from typing_extensions import override

log = logging.getLogger(__name__)


class TokenNormalizedLoss:
    """Mixin for a LightningModule: the loss of an optimizer step is the mean over all its target tokens.

    Under a strategy that accumulates and steps by itself (DeepSpeed), gradients cannot be rescaled before
    the step: the loss falls back to the mean over each micro-batch's tokens, with one warning.
    """

    _window_tokens: torch.Tensor | None = None
    _per_micro_batch: bool = False

    def token_loss(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
        """Count ``num_tokens`` towards this optimizer step; return ``loss_sum`` for ``training_step``."""
        count = torch.as_tensor(num_tokens, dtype=torch.float64, device=loss_sum.device).detach()
        if self._per_micro_batch:
            return loss_sum / count.clamp(min=1).to(loss_sum.dtype)
        self._window_tokens = count if self._window_tokens is None else self._window_tokens + count
        return loss_sum

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        tokens, self._window_tokens = self._window_tokens, None
        if tokens is None:
            return
        trainer = self.trainer
        total = trainer.strategy.reduce(tokens, reduce_op="sum")
        scale = float(trainer.accumulate_grad_batches * trainer.world_size / max(float(total), 1.0))
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._per_micro_batch = (
            self._trainer is not None and self.trainer.strategy.handles_gradient_accumulation
        )
        if self._per_micro_batch:
            log.warning(
                "%s accumulates and steps by itself, so token-level losses are averaged per micro-batch "
                "(not over all tokens of an optimizer step); use fsdp2 or ddp for exact token averaging",
                type(self.trainer.strategy).__name__,
            )
