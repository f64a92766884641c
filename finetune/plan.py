"""The run plan: what trains at what LR, the schedule, and the memory it needs — before the first step.

``run_plan(trainer, module)`` renders it once the optimizer exists (``on_fit_start``). ``ParameterReport``
logs it at the start of every run and saves ``<run>/plan.txt``; the ``plan`` command prints it and stops.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from finetune.display import human, table
from finetune.memory import activation_bytes, estimate_memory
from finetune.parallel.placement import Placement, is_sharded
from finetune.parallel.placement import from_trainer as placement_of

log = logging.getLogger(__name__)


def run_plan(trainer: pl.Trainer, module: pl.LightningModule, placement: Placement | None = None) -> str:
    """The plan as text: the task (``describe_task`` of finetune tasks), parameter groups, blocks,
    accumulation and schedule, memory estimate per device, and for image data how images are prepared.

    ``placement`` (default: the trainer's own) says over how many processes what is sharded; the ``plan``
    command passes the recipe's, since it builds everything on one device.
    """
    placement = placement or placement_of(trainer)
    describe = getattr(module, "describe_task", None)
    sections = [
        ("Task", describe() if callable(describe) else ""),
        ("Parameter groups", groups_table(trainer)),
        ("Blocks (bottom to top)", blocks_table(trainer, module)),
        ("Steps and schedule", schedule_lines(trainer)),
        ("Training memory per device (estimate)", memory_table(trainer, module, placement)),
        ("Data", data_lines(trainer)),
        ("Image preparation", image_lines(trainer)),
    ]
    return "\n\n".join(f"{title}\n{body}" for title, body in sections if body)


def data_lines(trainer: pl.Trainer) -> str:
    """Rows per split and where they are kept, or the stream and how far the run reads it
    (``describe_data`` of finetune's text data); empty for other data."""
    describe = getattr(getattr(trainer, "datamodule", None), "describe_data", None)
    return describe() if callable(describe) else ""


def image_lines(trainer: pl.Trainer) -> str:
    """The train and evaluation transforms of image data (``describe_preparation``); empty for other data."""
    describe = getattr(getattr(trainer, "datamodule", None), "describe_preparation", None)
    return describe() if callable(describe) else ""


def groups_table(trainer: pl.Trainer) -> str:
    rows = []
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            count = sum(p.numel() for p in group["params"])
            rows.append(
                [
                    group.get("name", "-"),
                    f"{count:,}",
                    f"{group.get('initial_lr', group['lr']):.2e}",
                    f"{group['lr']:.2e}",
                    f"{group.get('weight_decay', 0):g}",
                    group.get("block", "-"),
                ]
            )
    return table(["group", "params", "lr", "lr now", "weight decay", "blocks"], rows)


def blocks_table(trainer: pl.Trainer, module: pl.LightningModule) -> str:
    """Trainable (in the optimizer) vs frozen parameters per block; when each block opens."""
    from finetune.callbacks.unfreeze import GradualUnfreezing
    from finetune.optim.param_groups import level_label, parameter_levels

    layout, model = getattr(module, "layout", None), getattr(module, "model", None)
    if layout is None or model is None:
        return ""
    in_optimizer = {id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]}
    levels = parameter_levels(model, layout)
    counts: dict[int, list[int]] = {}
    for name, parameter in model.named_parameters():
        entry = counts.setdefault(levels[name], [0, 0])
        entry[0 if id(parameter) in in_optimizer else 1] += parameter.numel()
    unfreezing = next((c for c in trainer.callbacks if isinstance(c, GradualUnfreezing)), None)
    opens = _opening(unfreezing, trainer) if unfreezing is not None else {}
    rows = [
        [
            level_label(layout, level),
            f"{trainable:,}",
            f"{frozen:,}",
            opens.get(level_label(layout, level), "start" if trainable else "never (frozen)"),
        ]
        for level, (trainable, frozen) in sorted(counts.items())
    ]
    trainable, frozen = (sum(c[i] for c in counts.values()) for i in (0, 1))
    rows.append(["total", f"{trainable:,}", f"{frozen:,}", ""])
    return table(["block", "trainable", "frozen", "trains from"], rows)


def _opening(unfreezing: Any, trainer: pl.Trainer) -> dict[str, str]:
    """Block -> the epoch/step it opens at, from the callback's milestones."""
    groups = [g for o in trainer.optimizers for g in o.param_groups if "level" in g]
    if not groups:
        return {}
    top = max(g["level"] for g in groups)
    order = [
        next(g["block"] for g in groups if g["level"] == lv)
        for lv in sorted({g["level"] for g in groups if g["level"] < top}, reverse=True)
    ]
    opens = {}
    for i, block in enumerate(order):
        milestone = i // unfreezing.blocks_per_milestone
        if unfreezing.every is not None:
            at = unfreezing.every * (milestone + 1)
        elif milestone < len(unfreezing.milestones):
            at = unfreezing.milestones[milestone]
        else:
            opens[block] = "never"
            continue
        opens[block] = f"{unfreezing.interval} {at}"
    return opens


def schedule_lines(trainer: pl.Trainer) -> str:
    from finetune.callbacks.accumulation import ScheduledAccumulation
    from finetune.optim.schedules import GroupSchedule

    scheduled = next((c for c in trainer.callbacks if isinstance(c, ScheduledAccumulation)), None)
    if scheduled is not None:
        accumulation = f"scheduled by {scheduled.interval}: {scheduled.schedule}"
    else:
        accumulation = f"{trainer.accumulate_grad_batches} micro-batches per optimizer step"
    clip = trainer.gradient_clip_val
    clipping = f"{clip} by {trainer.gradient_clip_algorithm or 'norm'}" if clip else "off"
    lines = [
        f"accumulation: {accumulation}",
        f"gradient clipping: {clipping}",
    ]
    schedule = next(
        (c.scheduler for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, GroupSchedule)), None
    )
    if schedule is not None and hasattr(schedule.shape, "total"):
        shape = schedule.shape
        points = sorted(
            {
                0,
                shape.warmup,
                shape.total // 4,
                shape.total // 2,
                3 * shape.total // 4,
                max(shape.total - 1, 0),
            }
        )
        at = ", ".join(f"{step}: {shape(step):.3f}" for step in points)
        lines += [
            f"optimizer steps: {shape.total} (warmup {shape.warmup})",
            f"LR x each group's lr at step: {at}",
        ]
    return "\n".join(lines)


def memory_table(trainer: pl.Trainer, module: pl.LightningModule, placement: Placement) -> str:
    from finetune.optim.optimizers import state_bytes

    config = getattr(module, "optimizer_config", None)
    per_element = state_bytes(config) if config is not None else 8.0
    precision = str(trainer.precision)
    # Everything in the optimizer will train at some point (gradual unfreezing may hold some back now).
    in_optimizer = [p for o in trainer.optimizers for g in o.param_groups for p in g["params"]]
    held_back = [p for p in in_optimizer if not p.requires_grad]
    for parameter in held_back:
        parameter.requires_grad_(True)
    try:
        activations = _probe_activations(trainer, module, precision)
        estimate = estimate_memory(module, precision, per_element, activations)
    finally:
        for parameter in held_back:
            parameter.requires_grad_(False)
    weights, gradients, state = placement.per_device(
        estimate.weights, estimate.gradients, estimate.optimizer_state
    )
    rows: list[tuple[str, int | None]] = [
        ("weights", weights),
        ("gradients", gradients),
        ("optimizer state", state),
        ("activations (one micro-batch)", activations),
    ]
    teacher = _teacher_bytes(trainer)
    if teacher:
        rows.append(("distillation teacher (frozen, whole on every device)", teacher))
    rows.append(("total", sum(size or 0 for _, size in rows)))
    lines = [[name, human(size)] for name, size in rows]
    return f"{placement.describe()}\n" + table([f"precision {precision}", "bytes"], lines)


def _teacher_bytes(trainer: pl.Trainer) -> int:
    """Bytes of a distillation teacher's weights: not sharded, so every process holds all of it."""
    from finetune.distill import Distillation

    teachers = [c.teacher for c in trainer.callbacks if isinstance(c, Distillation) and c.teacher is not None]
    return sum(p.numel() * p.element_size() for t in teachers for p in t.model.parameters())


def _probe_activations(trainer: pl.Trainer, module: pl.LightningModule, precision: str) -> int | None:
    """Activation bytes of one training micro-batch through ``module(batch)``; None if that cannot run."""
    loader = trainer.train_dataloader
    if loader is None or is_sharded(module):
        # A sharded forward is a collective; the plan runs on rank 0 alone (the plan command measures it).
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # fetching a shuffled batch draws from the RNG
            batch = next(iter(loader))
        batch = trainer.strategy.batch_to_device(batch)
        return activation_bytes(module, lambda: module(batch), precision, module.device)
    except (TypeError, RuntimeError, ValueError, KeyError, StopIteration) as error:
        log.debug("activation probe failed: %s", error)
        return None
