"""finetune's callbacks on a user's own LightningModule, no finetune task involved: plain modules around a tiny
timm ResNet and a tiny BERT with ``AdamW(self.parameters())`` (or ``finetune.optim.param_groups``), and the
examples of the README section "Use the callbacks in your own LightningModule" run as they are written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from finetune.backbones import Backbone
from finetune.callbacks import MetricsReport, ParameterReport, ScheduledAccumulation
from finetune.callbacks.unfreeze import GradualUnfreezing
from finetune.distill import Distillation, FeatureMatch
from finetune.distill.losses import LogitKD, TeacherOutputs
from finetune.distill.student import FeatureTap
from finetune.errors import RecipeError
from finetune.optim import param_groups
from finetune.plan import describe
from finetune.tasks.loss_terms import LossTermsMixin
from tests.helpers.own_module import (
    BLOCKS,
    LR,
    WEIGHT_DECAY,
    Changes,
    Plain,
    Student,
    block_of,
    expected_changed,
    loader,
    tiny_network,
    trainer,
)

KINDS = ["timm", "hf"]
LABELS = ["a", "b", "c"]
DOC = Path(__file__).parents[2] / "README.md"


def by_hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T² · Σ p_teacher (log p_teacher - log p_student) per row, written out with exp/log."""
    p_t = torch.exp(teacher / t) / torch.exp(teacher / t).sum(-1, keepdim=True)
    p_s = torch.exp(student / t) / torch.exp(student / t).sum(-1, keepdim=True)
    return t**2 * (p_t * (p_t.log() - p_s.log())).sum(-1)


# -- GradualUnfreezing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_of_a_plain_module_open_top_down_and_closed_ones_stay_bitwise_still(kind):
    steps = len(BLOCKS[kind])  # the head, then one more block per step
    changes, unfreezing = Changes(kind), GradualUnfreezing(every=1, interval="step")
    module = Plain(kind)
    fit = trainer([unfreezing, changes], max_steps=steps)
    fit.fit(module, loader(kind, count=4 * steps))
    assert changes.changed == expected_changed(kind, steps)  # AdamW with weight decay 0.1: no decay either
    if kind == "timm":  # closed BatchNorm layers keep their running statistics
        assert changes.buffers_moved == [[b for b in changed if b != "head"] for changed in changes.changed]
    order = list(BLOCKS[kind])
    assert unfreezing.opened == {block: i for i, block in enumerate(order[1:], start=1)}
    optimizer = fit.optimizers[0]  # the user's optimizer, as built
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    assert (optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"]) == (LR, WEIGHT_DECAY)
    for name, parameter in module.named_parameters():  # no optimizer state while closed
        assert int(optimizer.state[parameter]["step"]) == steps - order.index(block_of(kind, name)), name
    assert all(p.requires_grad for p in module.parameters())  # handed back as it came


class Opening(pl.Callback):
    """At optimizer step ``step``: the top block's parameters and gradients before it, the parameters after."""

    def __init__(self, prefix: str, step: int = 1) -> None:
        self.prefix, self.step = prefix, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            named = [(n, p) for n, p in pl_module.named_parameters() if n.startswith(self.prefix)]
            self.before = {n: p.detach().clone() for n, p in named}
            self.grads = {n: p.grad.clone() for n, p in named}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters() if n in self.before}


@pytest.mark.parametrize("kind", KINDS)
def test_an_opening_block_moves_by_the_ramp_times_its_step_which_is_adamw_at_the_ramped_lr(kind):
    top = list(BLOCKS[kind])[1]  # opens at step 1
    runs = {}
    for warmup in (0, 2):
        opening = Opening(BLOCKS[kind][top][0])
        unfreezing = GradualUnfreezing(every=1, interval="step", warmup_steps=warmup)
        trainer([unfreezing, opening], max_steps=2).fit(Plain(kind), loader(kind, count=8))
        runs[warmup] = opening
    full, ramped = runs[0], runs[2]
    for name, before in ramped.before.items():
        torch.testing.assert_close(before, full.before[name])  # the same run up to the opening step
        torch.testing.assert_close(ramped.after[name] - before, 0.5 * (full.after[name] - before))
        reference = before.clone().requires_grad_(True)
        reference.grad = ramped.grads[name]
        torch.optim.AdamW([reference], lr=0.5 * LR, weight_decay=WEIGHT_DECAY).step()
        torch.testing.assert_close(ramped.after[name], reference.detach(), msg=name)


def test_resume_after_a_milestone_continues_exactly(tmp_path):
    def run(max_steps, ckpt_path=None, checkpoint=None):
        unfreezing = GradualUnfreezing(every=1, interval="step", warmup_steps=2)
        callbacks = [unfreezing, *([checkpoint] if checkpoint else [])]
        fit = trainer(callbacks, max_steps=max_steps, enable_checkpointing=checkpoint is not None)
        module = Plain("timm")
        # 2 batches per epoch: the checkpoint at step 2 closes an epoch (a plain DataLoader cannot resume mid-epoch)
        fit.fit(module, loader("timm", count=8), ckpt_path=ckpt_path)
        return module, fit, unfreezing

    straight, straight_fit, _ = run(5)
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    run(2, checkpoint=every_step)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=True)["callbacks"]
    assert {"net.layer4": 1} in [state.get("opened") for state in saved.values()]
    resumed, fit, unfreezing = run(5, ckpt_path=tmp_path / "step=2.ckpt")
    assert unfreezing.opened == {"net.layer4": 1, "net.layer3": 2, "net.layer2": 3, "net.layer1": 4}
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # weights and BatchNorm statistics
    ours, theirs = straight_fit.optimizers[0].state_dict(), fit.optimizers[0].state_dict()
    assert ours["param_groups"] == theirs["param_groups"] and ours["state"].keys() == theirs["state"].keys()
    for index, state in ours["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, theirs["state"][index][key])


@pytest.mark.slow
def test_a_plain_module_under_ddp_on_two_cpu_processes(tmp_path):
    script = Path(__file__).parents[1] / "helpers" / "own_module.py"
    out = tmp_path / "ddp.json"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, str(script), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    for state in ranks:
        assert state["changed"] == expected_changed("timm", 6)  # dropped gradients held closed blocks
        assert state["requires_grad"] and state["groups"] == 1  # requires_grad never changed; one group
        assert state["opened"] == {
            "net.layer4": 1,
            "net.layer3": 2,
            "net.layer2": 3,
            "net.layer1": 4,
            "embeddings": 5,
        }
    assert ranks[0]["weights"] == ranks[1]["weights"]


class Grouped(Plain):
    """The user builds the groups with finetune (layer-wise decay) and schedules them with torch."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(param_groups(self, lr=LR, layer_decay=0.5, weight_decay=WEIGHT_DECAY))
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class LRs(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs = getattr(self, "lrs", []) + [
            {g["block"]: g["lr"] for g in trainer.optimizers[0].param_groups}
        ]


def test_finetune_groups_under_the_users_scheduler():
    steps, order = 4, list(BLOCKS["hf"])
    changes, lrs = Changes("hf"), LRs()
    trainer([GradualUnfreezing(every=1, interval="step"), changes, lrs], max_steps=steps).fit(
        Grouped("hf"), loader("hf", count=16)
    )
    assert changes.changed == expected_changed("hf", steps)
    for step, seen in enumerate(lrs.lrs):  # layer-wise LRs, moved by the user's schedule alone
        assert seen == pytest.approx({block: LR * 0.5 ** order.index(block) * 0.5**step for block in order})


def test_modules_and_strategies_it_cannot_serve_are_refused_in_one_line():
    class Two(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def fit_start(callback, module, strategy=None, optimizer=None):
        optimizer = optimizer or torch.optim.SGD(module.parameters(), lr=0.1)
        stub = SimpleNamespace(optimizers=[optimizer], lr_scheduler_configs=[], strategy=strategy)
        callback.on_fit_start(stub, module)

    with pytest.raises(
        RecipeError, match=r"module: cannot tell which module of Two .* a \(20 parameters\), b"
    ):
        fit_start(GradualUnfreezing(every=1), Two())
    with pytest.raises(RecipeError, match=r"Two has no module 'backbone'; its modules: a \(20 parameters\)"):
        fit_start(GradualUnfreezing(every=1, module="backbone"), Two())
    with pytest.raises(RecipeError, match=r"param_groups.module: cannot tell which module of Two"):
        param_groups(Two())
    plain = Plain("hf")
    stray = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(RecipeError, match="holds 1 parameters that are not Plain's own"):
        fit_start(
            GradualUnfreezing(every=1), plain, optimizer=torch.optim.SGD([*plain.parameters(), stray], lr=0.1)
        )
    from lightning.pytorch.strategies import DeepSpeedStrategy

    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself need not be installed
    with pytest.raises(RecipeError, match="DeepSpeed owns the gradients"):
        fit_start(GradualUnfreezing(every=1), plain, strategy=deepspeed)


# -- parameter groups and the plan -------------------------------------------------------------------------


def test_param_groups_of_a_plain_module_by_hand():
    import finetune.optim
    import finetune.optim.groups  # noqa: F401  (the implementation module must not shadow the function)

    module = Plain("timm")
    groups = finetune.optim.param_groups(module, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    seen = {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}
    order = list(BLOCKS["timm"])
    assert seen.keys() == {name for name, _ in module.named_parameters()}
    for name, parameter in module.named_parameters():  # biases and BatchNorm weights do not decay
        depth = order.index(block_of("timm", name))
        assert seen[name] == (0.5**depth, 0.0 if parameter.ndim <= 1 else 0.1), name

    class Vit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 2)  # the user's own head, before the network: trains at lr
            self.net = __import__("timm").create_model("test_vit", num_classes=3)

    vit = {
        name: (g["lr"], g["weight_decay"])
        for g in param_groups(Vit(), lr=1.0, layer_decay=0.5)
        for name in g["names"]
    }
    assert (
        vit["net.pos_embed"] == (0.5**7, 0.0) and vit["net.cls_token"][1] == 0.0
    )  # timm's no_weight_decay()
    assert vit["head.weight"] == vit["net.head.weight"] == (1.0, 0.01)


def test_describe_prints_the_groups_and_blocks_of_a_plain_module():
    module = Plain("hf")
    optimizer = torch.optim.AdamW(param_groups(module, lr=1e-3, layer_decay=0.5))
    text = describe(module, optimizer, GradualUnfreezing(every=2))
    groups, blocks = text.split("Blocks (bottom to top)")
    assert "Parameter groups" in groups and "net.bert.encoder.layer.0 (no decay)" in groups
    rows = {line.split()[0]: line for line in blocks.strip().splitlines()[2:]}
    assert rows["net.bert.encoder.layer.1"].endswith("epoch 2") and rows["embeddings"].endswith("epoch 6")
    assert rows["net.bert.encoder.layer.0"].endswith("epoch 4") and rows["head"].endswith("start")


# -- accumulation and reports ------------------------------------------------------------------------------


class Factors(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.factors = getattr(self, "factors", []) + [trainer.accumulate_grad_batches]


@pytest.mark.parametrize("kind", KINDS)
def test_scheduled_accumulation_on_a_plain_module(kind):
    accumulation, factors = ScheduledAccumulation({0: 2, 1: 1}), Factors()
    fit = trainer([accumulation, factors], max_epochs=2)
    fit.fit(Plain(kind), loader(kind, count=16))  # 4 batches per epoch
    assert factors.factors == [2, 1]
    assert fit.global_step == 2 + 4 == accumulation.total_optimizer_steps(fit)


def test_reports_on_a_plain_module(tmp_path):
    callbacks = [GradualUnfreezing(every=1), ParameterReport(), MetricsReport()]
    trainer(callbacks, max_epochs=2, default_root_dir=tmp_path).fit(Plain("timm"), loader("timm", count=8))
    blocks = (tmp_path / "plan.txt").read_text().split("Blocks (bottom to top)\n")[1].split("\n\n")[0]
    rows = {line.split()[0]: line for line in blocks.splitlines()[2:]}
    assert rows["net.layer4"].endswith("epoch 1") and rows["net.layer3"].endswith("epoch 2")
    assert rows["head"].endswith("start") and "embeddings" in rows
    assert "net.fc" in (tmp_path / "parameters.txt").read_text()
    assert "train/loss" in (tmp_path / "metrics_fit.txt").read_text()


# -- distillation through LossTermsMixin -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory) -> Path:
    """An export folder: a 48-wide BERT classifier over LABELS (the students' vocabulary) with labels.json."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("teacher")
    config = BertConfig(
        vocab_size=40,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=16,
        num_labels=len(LABELS),
    )
    torch.manual_seed(3)
    BertForSequenceClassification(config).save_pretrained(folder)
    (folder / "labels.json").write_text(json.dumps(LABELS))
    return folder


def test_export_and_prediction_writers_say_what_a_plain_module_lacks(tmp_path):
    from finetune.callbacks import ExportModel, PredictionWriter

    with pytest.raises(
        RecipeError, match=r"^trainer\.callbacks\.ExportModel: Plain has no export or load_weights"
    ):
        trainer([ExportModel()], max_epochs=1, default_root_dir=tmp_path).fit(
            Plain("timm"), loader("timm", count=4)
        )

    from tests.helpers.own_module import logits_of

    class Predicting(Plain):
        def forward(self, batch: dict) -> torch.Tensor:
            return logits_of(self.net, batch)

    with pytest.raises(
        RecipeError, match=r"^trainer\.callbacks\.PredictionWriter: Predicting has no prediction"
    ):
        trainer([PredictionWriter()], default_root_dir=tmp_path).predict(
            Predicting("timm"), loader("timm", count=4)
        )


def test_the_mixins_total_loss_is_the_kd_formula_by_hand():
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.3, -2.0]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [-0.5, 2.5, 0.1]])
    module = Student("hf")
    module.add_loss_term(LogitKD(lambda: TeacherOutputs(teacher), alpha=0.3, temperature=4.0))
    total = module.total_loss(logits=student, batch={}, task_loss=torch.tensor(0.9))
    assert torch.allclose(total, 0.3 * 0.9 + 0.7 * by_hand_kl(student, teacher, 4.0).mean(), atol=1e-6)


def test_distillation_into_a_plain_module_is_the_kd_loss_by_the_formula(bert_teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification

    module = Student("hf", labels=LABELS)
    trainer([Distillation(str(bert_teacher), alpha=0.3, temperature=2.0)], max_steps=1).fit(
        module, loader("hf", count=4)
    )
    batch = next(iter(loader("hf", count=4)))
    teacher = AutoModelForSequenceClassification.from_pretrained(bert_teacher).eval()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    step = module.steps[0]
    kl = by_hand_kl(step["logits"], teacher_logits, 2.0).mean()
    torch.testing.assert_close(step["total"], 0.3 * step["task_loss"] + 0.7 * kl)
    assert not module.loss_terms  # the terms leave with the run


class Captured(pl.Callback):
    """At the first step: the teacher's outputs, the student's pooled features and the projection."""

    def __init__(self, distillation: Distillation) -> None:
        self.distillation = distillation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.teacher = self.distillation.current()
            with torch.no_grad():
                net = pl_module.net
                self.pooled = net.forward_head(net.forward_features(batch["pixel_values"]), pre_logits=True)
            self.linear = pl_module.loss_modules["feature"][0]  # leaves the module with the run
            self.projection = self.linear.weight.detach().clone()
            self.bias = self.linear.bias.detach().clone()


def test_feature_distillation_into_a_plain_timm_module_by_the_formula():
    teacher = Backbone(name="timm:test_vit", pretrained=False)  # a spec: its head is sized to the labels
    distillation = Distillation(
        teacher, alpha=0.5, temperature=2.0, features=[FeatureMatch("pooled", "pooled")]
    )
    module, captured = Student("timm", labels=LABELS), Captured(distillation)
    # 160x160, the size both models' statistics give: the teacher's inputs are then the student's
    trainer([distillation, captured], max_steps=2).fit(module, loader("timm", count=8, size=160))
    step = module.steps[0]
    kl = by_hand_kl(step["logits"], captured.teacher.logits, 2.0).mean()
    projected = captured.pooled @ captured.projection.T + captured.bias  # resnet 96 wide -> vit 64
    feature = (projected - captured.teacher.features["pooled"]).pow(2).mean(-1).mean()
    torch.testing.assert_close(step["total"], 0.5 * step["task_loss"] + 0.5 * kl + feature)
    assert not torch.equal(captured.linear.weight, captured.projection)  # the projection trained
    assert "feature" not in module.loss_modules  # and left with the run


@pytest.mark.parametrize("kind", KINDS)
def test_feature_taps_keep_what_the_network_computes(kind):
    net = tiny_network(kind).eval()
    batch = next(iter(loader(kind, count=4)))
    if kind == "timm":
        tap = FeatureTap(net, "timm", ("pooled",))
        run = lambda: net(batch["pixel_values"])  # noqa: E731
    else:
        tap = FeatureTap(net, "hf", ("pooled", "hidden.1", "hidden.-1"))
        run = lambda: net(batch["input_ids"], batch["attention_mask"]).logits  # noqa: E731  (mask positional)
    with torch.no_grad():
        run()
    assert tap.kept is None  # nothing kept without gradients (validation)
    logits = run()
    kept = tap.read()
    with pytest.raises(RecipeError, match="ran no training forward pass"):
        tap.read()  # each pass is read once
    tap.remove()
    with torch.no_grad():
        if kind == "timm":
            pixels = batch["pixel_values"]
            expected = {"pooled": net.forward_head(net.forward_features(pixels), pre_logits=True)}
            plain = net(pixels)
        else:
            output = net(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
            weights = batch["attention_mask"].unsqueeze(-1).float()
            last = output.hidden_states[-1]
            expected = {
                "pooled": (last * weights).sum(1) / weights.sum(1),
                "hidden.1": output.hidden_states[1],
                "hidden.-1": last,
            }
            plain = output.logits
    assert kept.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(kept[name], value, msg=name)
    torch.testing.assert_close(logits, plain)  # the tap changes nothing the caller sees


class NoLoss(Student):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch["pixel_values"]), batch["labels"])


class Tuples(Student):
    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        logits = self.net(pixels)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return self.total_loss(logits=logits, batch=batch, task_loss=loss)


class MixinLast(pl.LightningModule, LossTermsMixin):
    """The mixin after LightningModule: its __init__ never runs (torch's Module.__init__ does not chain)."""

    training_step = Student.training_step
    configure_optimizers = Student.configure_optimizers

    def __init__(self):
        super().__init__()
        self.net = tiny_network("timm")


@pytest.mark.parametrize(
    ("module", "data", "teacher", "message"),
    [
        (
            lambda: Plain("timm"),
            None,
            "export",
            "Plain has no total_loss: inherit finetune.LossTermsMixin and return",
        ),
        (
            MixinLast,
            None,
            "export",
            "LossTermsMixin.__init__ did not run: list LossTermsMixin before LightningModule",
        ),
        (
            lambda: NoLoss("timm", LABELS),
            None,
            "vit",
            "NoLoss.training_step did not go through the loss terms",
        ),
        (lambda: Student("timm"), None, "vit", "Distillation.teacher: Student has no labels and the teacher"),
        (
            lambda: Tuples("timm", LABELS),
            "tuples",
            "vit",
            r"Tuples's batches are lists, not dicts .* teacher_inputs",
        ),
    ],
)
def test_what_a_module_lacks_is_named_in_one_line(module, data, teacher, message, bert_teacher):
    source = str(bert_teacher) if teacher == "export" else Backbone(name="timm:test_vit", pretrained=False)
    rows = loader("timm", count=4)
    if data == "tuples":
        rows = torch.utils.data.DataLoader(
            [(r["pixel_values"], r["labels"]) for r in rows.dataset], batch_size=4
        )
    with pytest.raises(RecipeError, match=message):
        trainer([Distillation(source)], max_steps=1).fit(module(), rows)


def test_feature_matches_need_a_timm_or_hugging_face_network(bert_teacher):
    class Custom(Student):
        def __init__(self):
            super().__init__("hf", labels=LABELS)
            self.net = torch.nn.Sequential(
                torch.nn.Embedding(40, 8), torch.nn.Flatten(), torch.nn.Linear(64, 3)
            )

    distillation = Distillation(str(bert_teacher), features=[FeatureMatch("pooled", "pooled")])
    with pytest.raises(RecipeError, match="features: feature matches read a timm or Hugging Face network"):
        trainer([distillation], max_steps=1).fit(Custom(), loader("hf", count=4))


# -- the README examples --------------------------------------------------------------------


def example(name: str, replacements: dict[str, str], tmp_path: Path, monkeypatch) -> dict:
    """Run the ```python block after ``<!-- own-module-NAME -->`` with tiny models in place of the named ones."""
    code = re.search(rf"<!-- own-module-{name} -->\s*```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    for old, new in replacements.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the examples' run folders (lightning_logs/) go here
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, f"{DOC}#{name}", "exec"), namespace)
    return namespace


def test_doc_gradual_unfreezing(tmp_path, monkeypatch):
    ran = example(
        "unfreeze", {'"resnet18", pretrained=True': '"test_resnet", pretrained=False'}, tmp_path, monkeypatch
    )
    # 2 batches per epoch: one more block at each epoch's first step
    assert ran["unfreezing"].opened == {"net.layer4": 2, "net.layer3": 4, "net.layer2": 6, "net.layer1": 8}
    assert ran["trainer"].global_step == 10


def test_doc_param_groups_and_plan(tmp_path, monkeypatch, capsys):
    replacements = {
        '"vit_small_patch16_224", pretrained=True': '"test_vit", pretrained=False',
        "torch.randn(3, 224, 224)": "torch.randn(3, 160, 160)",
    }
    ran = example("param-groups", replacements, tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert "Parameter groups" in printed and "Blocks (bottom to top)" in printed
    groups = ran["trainer"].optimizers[0].param_groups
    assert [g["lr"] for g in groups if g["rule"] == "pos_embed"] == [1e-4]
    by_level = sorted({g["lr"] for g in groups if g["rule"] is None}, reverse=True)
    assert by_level == pytest.approx([1e-3 * 0.75**k for k in range(8)])  # test_vit: 6 blocks, stem, head


def test_doc_accumulation_and_reports(tmp_path, monkeypatch, tiny_bert_dir):
    ran = example("accumulation", {'"prajjwal1/bert-tiny"': repr(str(tiny_bert_dir))}, tmp_path, monkeypatch)
    fit = ran["trainer"]
    assert fit.global_step == 1 + 1 + 4  # 4 batches per epoch: factor 4 for two epochs, then 1
    run = Path(fit.log_dir)
    assert "Blocks (bottom to top)" in (run / "plan.txt").read_text()
    assert "train/loss" in (run / "metrics_fit.txt").read_text()


def test_doc_distillation(tmp_path, monkeypatch, tiny_bert_dir):
    from tests.helpers.models import bert_folder, export_classifier

    backbone = bert_folder(tmp_path / "teacher-backbone", tiny_bert_dir, hidden=48)
    teacher = export_classifier(backbone, ["negative", "positive"], tmp_path / "teacher")
    replacements = {
        '"prajjwal1/bert-tiny"': repr(str(tiny_bert_dir)),
        '"hf:textattack/bert-base-uncased-SST-2"': repr(str(teacher)),
    }
    ran = example("distillation", replacements, tmp_path, monkeypatch)
    assert ran["trainer"].global_step == 8
    assert (
        "train/kd_loss" in ran["trainer"].callback_metrics
        and "train/feature_loss" in ran["trainer"].callback_metrics
    )
