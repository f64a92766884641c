"""Accumulation: micro-batches add up to the big batch; token-level normalisation; scheduled factors."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from finetune.callbacks.accumulation import ScheduledAccumulation
from finetune.errors import RecipeError
from tests.helpers.causal_lm import CausalLM, pad, sequences


class Grads(pl.Callback):
    """Keeps the gradients of the (single) optimizer step as the optimizer saw them."""

    def on_train_end(self, trainer, pl_module):
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def trainer(**kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**(options | kwargs))


def step_grads(module, loader, accumulate: int) -> dict[str, torch.Tensor]:
    probe = Grads()
    trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[probe]).fit(module, loader)
    return probe.grads


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_four_micro_batches_of_8_equal_one_batch_of_32():
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(32, 6), torch.randn(32, 1))
    small = step_grads(Regression(), DataLoader(data, batch_size=8), accumulate=4)
    big = step_grads(Regression(), DataLoader(data, batch_size=32), accumulate=1)
    assert_close(small, big)


@pytest.mark.slow
def test_token_level_loss_matches_one_big_batch_on_variable_lengths():
    data = sequences(32)
    big = step_grads(CausalLM(), DataLoader(data, batch_size=32, collate_fn=pad), accumulate=1)
    small = step_grads(CausalLM(), DataLoader(data, batch_size=8, collate_fn=pad), accumulate=4)
    assert_close(small, big)
    single = step_grads(CausalLM(), DataLoader(data, batch_size=1, collate_fn=pad), accumulate=32)
    assert_close(single, big)
    naive = step_grads(
        CausalLM(normalize=False), DataLoader(data, batch_size=8, collate_fn=pad), accumulate=4
    )
    assert not torch.allclose(naive["model.lm_head.weight"], big["model.lm_head.weight"], rtol=1e-3)


class Factors(pl.Callback):
    """Records (epoch, batch_idx, global_step, accumulate_grad_batches) at every batch."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(
            (trainer.current_epoch, batch_idx, trainer.global_step, trainer.accumulate_grad_batches)
        )


class Scheduled(Regression):
    def configure_optimizers(self):
        from finetune.optim import ScheduleConfig
        from finetune.optim.schedules import build_schedule, total_steps

        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.planned = total_steps(self.trainer)
        return [optimizer], build_schedule(optimizer, ScheduleConfig(name="cosine"), self.planned, "x", "min")


def run_schedule(callback: ScheduledAccumulation, epochs: int) -> tuple[Scheduled, pl.Trainer, Factors]:
    data = TensorDataset(torch.randn(16, 6), torch.randn(16, 1))
    module, factors = Scheduled(), Factors()
    fit = trainer(max_epochs=epochs, callbacks=[factors, callback])
    callbacks = [c for c in fit.callbacks if isinstance(c, Factors | ScheduledAccumulation)]
    assert factors in callbacks  # ours run in the order given: the probe sees the previous batch's factor
    fit.fit(module, DataLoader(data, batch_size=2))  # 8 batches per epoch
    return module, fit, factors


def test_scheduled_accumulation_by_epoch():
    module, fit, factors = run_schedule(ScheduledAccumulation({0: 4, 2: 2, 3: 1}), epochs=4)
    per_epoch = {epoch: factor for epoch, batch, _, factor in factors.seen if batch == 1}
    assert per_epoch == {0: 4, 1: 4, 2: 2, 3: 1}
    assert fit.global_step == module.planned == 2 + 2 + 4 + 8
    assert fit.lr_scheduler_configs[0].scheduler.last_epoch == module.planned


def test_scheduled_accumulation_by_step():
    callback = ScheduledAccumulation({0: 4, 3: 2, 5: 1}, interval="step")
    module, fit, factors = run_schedule(callback, epochs=2)
    # epoch 0: steps after batches 4 and 8; epoch 1: step 3 after 4 batches, then factor 2 (step 3 reached
    # at an aligned boundary), steps 4 and 5 after batches 6 and 8; factor 1 from step 5: epoch ends.
    assert fit.global_step == module.planned == 5
    assert callback.factor == 2  # step 5 was reached on the epoch's last batch
    assert fit.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert callback.total_optimizer_steps(fit) == 5
    longer = ScheduledAccumulation({0: 4, 3: 2, 5: 1}, interval="step")
    _, fit, _ = run_schedule(longer, epochs=3)
    assert fit.global_step == 5 + 8  # epoch 2 at factor 1
    assert longer.state_dict() == {"factor": 1}


def test_scheduled_accumulation_errors():
    deepspeed_like = SimpleNamespace(strategy=SimpleNamespace(handles_gradient_accumulation=True))
    with pytest.raises(RecipeError, match="fixes accumulation"):
        ScheduledAccumulation({0: 2}).setup(deepspeed_like, Regression(), "fit")
    fixed = SimpleNamespace(
        strategy=SimpleNamespace(handles_gradient_accumulation=False), accumulate_grad_batches=4
    )
    with pytest.raises(RecipeError, match="trainer.accumulate_grad_batches: leave it at 1"):
        ScheduledAccumulation({0: 2}).setup(fixed, Regression(), "fit")
    with pytest.raises(RecipeError, match="factor >= 1"):
        ScheduledAccumulation({0: 0})


def test_token_loss_falls_back_to_per_micro_batch_means_where_the_strategy_steps_itself(caplog):
    """DeepSpeed accumulates and steps inside its engine: gradients cannot be rescaled before the step, so the
    loss of a micro-batch becomes its own token mean (with a warning), and nothing is rescaled."""
    module = CausalLM()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(handles_gradient_accumulation=True))
    with caplog.at_level("WARNING", logger="finetune"):
        module.setup("fit")
    assert "averaged per micro-batch" in caplog.text
    loss = module.token_loss(torch.tensor(12.0), torch.tensor(4))
    assert loss.item() == pytest.approx(3.0)
    assert module._window_tokens is None  # nothing to rescale at the optimizer step
