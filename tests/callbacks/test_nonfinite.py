"""StopOnNonFinite: the first NaN/Inf loss stops training before it reaches the weights, in one line naming
the step and rows; with skip_batches the bad step is dropped and training goes on."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from finetune.callbacks import StopOnNonFinite
from finetune.errors import RecipeError

POISONED = 5  # the row whose loss is NaN


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.snapshots: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = (self.layer(batch["x"]).squeeze(-1) - batch["y"]).pow(2)
        loss = torch.where(batch["index"] == POISONED, torch.full_like(loss, float("nan")), loss)
        return loss.mean()

    def on_train_batch_start(self, batch, batch_idx):
        self.snapshots.append(self.layer.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rows() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [{"x": torch.randn(3), "y": torch.randn(()), "index": torch.tensor(i)} for i in range(8)]


def fit(callback: StopOnNonFinite, tmp_path) -> Regression:
    module = Regression()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=1)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback, checkpoints],
        default_root_dir=tmp_path, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(rows(), batch_size=2))
    return module


def test_the_first_nan_stops_before_the_step_naming_step_rows_and_checkpoint(tmp_path):
    callback = StopOnNonFinite()
    with pytest.raises(
        RecipeError,
        match=r"optimizer.lr: non-finite loss at step 2 \(rows 4, 5\); the last good checkpoint is .*last.ckpt",
    ):
        fit(callback, tmp_path)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_skip_batches_drops_the_bad_step_and_goes_on(tmp_path):
    module = fit(StopOnNonFinite(skip_batches=1), tmp_path)
    before, after = module.snapshots[2], module.snapshots[3]
    assert torch.equal(before, after)  # the poisoned step changed nothing
    assert torch.isfinite(module.layer.weight).all()
    assert not torch.equal(module.snapshots[3], module.layer.weight)  # training went on after it


def test_a_checkpoint_with_non_finite_weights_is_refused():
    callback = StopOnNonFinite()
    with pytest.raises(RecipeError, match="refusing to save a checkpoint with non-finite weights"):
        callback.on_save_checkpoint(None, None, {"state_dict": {"w": torch.tensor([1.0, float("inf")])}})
