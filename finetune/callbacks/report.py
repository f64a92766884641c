"""What the user sees: which parameters train at what learning rate (at start), and the final metrics (at end)."""

from __future__ import annotations

import logging
from collections import defaultdict

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from finetune import runs
from finetune.display import table
from finetune.plan import run_plan
from finetune.strategies.adapters import adapter_summary, adapter_targets, has_adapters

log = logging.getLogger(__name__)


def _module_of(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def parameter_table(module: nn.Module, optimizers: list | None = None, depth: int = 3) -> str:
    """Trainable vs total parameters per module (names cut to ``depth`` parts), with each module's LR."""
    lr_of: dict[int, float] = {}
    for optimizer in optimizers or []:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                lr_of[id(parameter)] = group["lr"]
    totals: dict[str, list] = defaultdict(lambda: [0, 0, set()])
    for name, parameter in module.named_parameters():
        entry = totals[_module_of(name.rpartition(".")[0] or name, depth)]
        entry[1] += parameter.numel()
        if parameter.requires_grad:
            entry[0] += parameter.numel()
            if id(parameter) in lr_of:
                entry[2].add(lr_of[id(parameter)])
    rows = [
        [
            name,
            f"{trainable:,}",
            f"{total:,}",
            f"{100 * trainable / total:.1f}%",
            ", ".join(f"{lr:.2e}" for lr in sorted(lrs)) or "-",
        ]
        for name, (trainable, total, lrs) in totals.items()
    ]
    trainable = sum(entry[0] for entry in totals.values())
    total = sum(entry[1] for entry in totals.values())
    rows.append(["total", f"{trainable:,}", f"{total:,}", f"{100 * trainable / max(total, 1):.1f}%", ""])
    return table(["module", "trainable", "total", "share", "lr"], rows)


def adapter_line(module: nn.Module) -> str:
    """``adapters on N modules: ...`` when ``module`` holds peft adapters, else empty."""
    if not any(has_adapters(m) for m in module.modules()):
        return ""
    targets = adapter_targets(module)
    return f"adapters on {len(targets)} modules: {adapter_summary(targets)}"


class ParameterReport(pl.Callback):
    """At the start of ``fit``, logs the run plan (``finetune.plan.run_plan``: parameter groups, blocks,
    schedule, memory estimate) and writes it to ``<run>/plan.txt``; the per-module table (and the modules
    carrying adapters) goes to ``<run>/parameters.txt``. Works on any ``LightningModule``: the blocks of
    yours are those of its pretrained network (``finetune.optim.network``), as ``param_groups`` and
    ``GradualUnfreezing`` see them; the run folder is the logger's (``default_root_dir`` without one)."""

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        plan = run_plan(trainer, pl_module)
        adapters = adapter_line(pl_module)
        plan = f"{plan}\n{adapters}" if adapters else plan
        log.info("Run plan (per device):\n\n%s", plan)
        _write(trainer, runs.PLAN, plan)
        table = parameter_table(pl_module, trainer.optimizers, self.depth)
        _write(trainer, runs.PARAMETERS, f"{table}\n{adapters}" if adapters else table)


class MetricsReport(pl.Callback):
    """At the end of ``fit`` and ``test``, logs the final metrics and writes ``<run>/metrics_<stage>.txt``."""

    def _report(self, trainer: pl.Trainer, stage: str) -> None:
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
        if not metrics or not trainer.is_global_zero:
            return
        text = table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()])
        log.info("Final metrics (%s):\n%s", stage, text)
        _write(trainer, runs.metrics_file(stage), text)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "fit")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "test")


def _write(trainer: pl.Trainer, filename: str, text: str) -> None:
    path = runs.run_dir(trainer) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
