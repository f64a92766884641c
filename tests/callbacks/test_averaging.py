"""EMA: validation, checkpoints, the module after fit and the export hold the average computed by hand from
the weights of each step; only trained weights (LoRA: the adapters and the head) are averaged; resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from finetune.callbacks.averaging import EMA
from finetune.callbacks.export import ExportModel
from finetune.errors import RecipeError
from tests.helpers.unfreeze_run import LABELS, dataset, trainer

DECAY = 0.6


class Tiny(pl.LightningModule):
    """A trained body with BatchNorm, a frozen layer, and two heads sharing one weight (tied)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.tied = nn.Linear(4, 2)
        self.tied.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.frozen(self.norm(self.body(x)))
        return self.head(hidden) + self.tied(hidden)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


AVERAGED = {
    "body.weight", "body.bias", "norm.weight", "norm.bias", "head.weight", "head.bias", "tied.bias",
    "norm.running_mean", "norm.running_var",
}  # fmt: skip


def rows() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, generator=generator), torch.tensor(i % 2)) for i in range(8)]


class Record(pl.Callback):
    """The module's state after each optimizer step, what validation runs on, and the checkpoints' content."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self.validated: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(copy_state(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validated.append(copy_state(pl_module))


def copy_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def by_hand(steps: list[dict[str, torch.Tensor]], names, decay: float = DECAY) -> dict[str, torch.Tensor]:
    """The EMA of ``names`` over the states after each step: the first copied, then decay * old + (1 - decay) * new."""
    average = {name: steps[0][name].float() for name in names}
    for state in steps[1:]:
        average = {name: decay * average[name] + (1 - decay) * state[name].float() for name in names}
    return average


def assert_equal(actual: dict, expected: dict, names) -> None:
    for name in names:
        torch.testing.assert_close(actual[name].float(), expected[name], msg=name, rtol=1e-5, atol=1e-6)


def fit(max_epochs: int, tmp_path, ckpt_path=None) -> tuple[Tiny, EMA, Record]:
    model, ema, record = Tiny(), EMA(decay=DECAY), Record()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, filename="{epoch}")
    run = trainer(-1, [ema, record, checkpoints], max_epochs=max_epochs, enable_checkpointing=True)
    loader = DataLoader(rows(), batch_size=2)  # 4 steps an epoch, in order
    run.fit(model, loader, loader, ckpt_path=ckpt_path)
    return model, ema, record


def test_validation_checkpoints_and_the_final_module_hold_the_average_of_the_trained_weights(tmp_path):
    model, ema, record = fit(2, tmp_path)
    assert set(ema.names) == AVERAGED  # no frozen weight, no integer buffer (num_batches_tracked)
    assert len(record.steps) == 8 and len(record.validated) == 2
    for epoch, validated in enumerate(record.validated):
        steps = record.steps[: 4 * (epoch + 1)]
        assert_equal(validated, by_hand(steps, AVERAGED), AVERAGED)
        assert torch.equal(validated["norm.num_batches_tracked"], steps[-1]["norm.num_batches_tracked"])
        assert_equal(validated, by_hand(steps[-1:], ["frozen.weight"]), ["frozen.weight"])

        saved = torch.load(tmp_path / f"epoch={epoch}.ckpt", weights_only=True)
        average = by_hand(steps, AVERAGED)
        assert_equal(saved["state_dict"], average, AVERAGED)
        torch.testing.assert_close(saved["state_dict"]["tied.weight"], average["head.weight"])  # each name
        assert_equal(saved["ema"]["weights"], by_hand(steps[-1:], AVERAGED), AVERAGED)  # the live ones
        assert int(saved["ema"]["n_averaged"]) == len(steps)

    final = by_hand(record.steps, AVERAGED)
    assert_equal(copy_state(model), final, AVERAGED)
    assert not torch.equal(
        final["body.weight"], record.steps[-1]["body.weight"]
    )  # the average is not the last


def test_a_resumed_run_continues_the_same_average(tmp_path):
    straight, _, _ = fit(2, tmp_path / "straight")
    fit(1, tmp_path / "first")
    resumed, _, record = fit(2, tmp_path / "second", ckpt_path=tmp_path / "first" / "last.ckpt")
    assert len(record.steps) == 4  # only the second epoch ran
    for (name, a), b in zip(copy_state(straight).items(), copy_state(resumed).values()):
        torch.testing.assert_close(a, b, msg=name, rtol=0, atol=1e-7)


@pytest.mark.slow
def test_lora_averages_the_adapters_and_head_and_exports_the_average(tiny_bert_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from finetune.strategies import LoRA
    from finetune.tasks import ClassificationTask

    torch.manual_seed(0)
    task = ClassificationTask(str(tiny_bert_dir), strategy=LoRA(rank=2), labels=LABELS)
    ema, record = EMA(decay=DECAY), Record()
    best = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/acc", mode="max")
    callbacks = [ema, record, best, ExportModel()]
    run = trainer(-1, callbacks, max_epochs=1, default_root_dir=tmp_path, enable_checkpointing=True)
    rows = dataset(tiny_bert_dir, count=12)
    run.fit(task, DataLoader(rows, batch_size=4), DataLoader(rows, batch_size=4))

    trained = {n for n, p in task.named_parameters() if p.requires_grad}
    assert set(ema.names) == trained  # tiny BERT has no floating-point buffers
    assert all("lora_" in n or n.startswith("model.classifier.") for n in trained)
    average = by_hand(record.steps, trained)
    assert_equal(record.validated[0], average, trained)

    # Reloaded with plain peft, the export holds the average: peft names the head a module to save.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=len(LABELS))
    exported = dict(PeftModel.from_pretrained(base, tmp_path / "export").named_parameters())
    peft_name = {
        n: "base_model.model."
        + n.removeprefix("model.").replace("classifier.", "classifier.modules_to_save.default.")
        for n in trained
    }
    assert_equal({n: exported[peft_name[n]].detach() for n in trained}, average, trained)


def test_bad_arguments_and_strategies_with_checkpoints_of_their_own():
    with pytest.raises(RecipeError, match=r"trainer.callbacks.EMA.decay: must be in \[0, 1\)"):
        EMA(decay=1.0)
    with pytest.raises(RecipeError, match="update_every_n_steps: must be 1 or more"):
        EMA(update_every_n_steps=0)

    class OwnCheckpoints:  # as DeepSpeed, FSDP and fsdp2: weights restored after setup, in their own format
        restore_checkpoint_after_setup = True

    stub = type("Trainer", (), {"strategy": OwnCheckpoints()})()
    with pytest.raises(RecipeError, match="trainer.strategy: EMA works on one device or under ddp, not Own"):
        EMA().setup(stub, Tiny(), "fit")
