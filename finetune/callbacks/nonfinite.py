"""Stop at the first non-finite loss or gradient, before it reaches the weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from finetune.batch import INDEX
from finetune.errors import RecipeError

log = logging.getLogger(__name__)
KEY = "optimizer.lr"


class StopOnNonFinite(pl.Callback):
    """Check every micro-batch's loss and, before each optimizer step, the gradients: at the first NaN or
    Inf, stop with one line naming the step, the batch's rows (its ``index``) and the last good checkpoint
    (``RecipeError``, exit 2 through the CLI). The offending step never reaches the weights, so no checkpoint
    ever holds non-finite weights; saving one is refused as well.

    Args:
        skip_batches: instead of stopping, skip up to this many optimizer steps with a non-finite loss or
            gradient (their gradients are dropped, with a warning each); stop at the next one.

    Under ``16-mixed`` precision, infinite gradients are the loss scaler's business (it skips those steps
    itself), so only the loss is checked.
    """

    def __init__(self, skip_batches: int = 0) -> None:
        if skip_batches < 0:
            raise RecipeError(
                "trainer.callbacks.StopOnNonFinite.skip_batches", f"must be >= 0, got {skip_batches}"
            )
        self.skip_batches = skip_batches
        self.skipped = 0
        self._rows: list[int] = []
        self._bad_loss = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, dict) and isinstance(batch.get(INDEX), torch.Tensor):
            self._rows.extend(batch[INDEX].tolist())

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if not torch.isfinite(loss.detach()).all():
            self._bad_loss = True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        rows, self._rows = self._rows, []
        bad_loss, self._bad_loss = self._bad_loss, False
        check_gradients = str(trainer.precision) != "16-mixed"
        if not bad_loss and not (check_gradients and _non_finite_gradients(pl_module)):
            return
        what = "loss" if bad_loss else "gradient"
        where = f"step {trainer.global_step} (rows {_rows_text(rows)})"
        if self.skipped < self.skip_batches:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)
            log.warning(
                "Non-finite %s at %s: step skipped (%d of %d)", what, where, self.skipped, self.skip_batches
            )
            return
        raise RecipeError(
            KEY,
            f"non-finite {what} at {where}; the last good checkpoint is {_last_checkpoint(trainer)}; lower the "
            "learning rate, check those rows, or add trainer.callbacks StopOnNonFinite(skip_batches=N)",
        )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        bad = [
            name
            for name, t in checkpoint.get("state_dict", {}).items()
            if t.is_floating_point() and not torch.isfinite(t).all()
        ]
        if bad:
            raise RecipeError(KEY, f"refusing to save a checkpoint with non-finite weights ({bad[0]} ...)")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


def _non_finite_gradients(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and not torch.isfinite(p.grad).all() for p in module.parameters())


def _rows_text(rows: list[int]) -> str:
    if not rows:
        return "unknown"
    shown = ", ".join(map(str, rows[:8]))
    return shown + (f" ... {len(rows)} rows" if len(rows) > 8 else "")


def _last_checkpoint(trainer: pl.Trainer) -> str:
    paths = [
        Path(p) for c in trainer.checkpoint_callbacks for p in (c.last_model_path, c.best_model_path) if p
    ]
    newest = max((p for p in paths if p.exists()), key=lambda p: p.stat().st_mtime, default=None)
    return str(newest) if newest else "none (no checkpoint written yet)"
