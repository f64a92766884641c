"""The run plan: what trains at what LR, the schedule, and the memory it needs — before the first step.

``run_plan(trainer, module)`` renders it once the optimizer exists (``on_fit_start``). ``ParameterReport``
logs it at the start of every run and saves ``<run>/plan.txt``; the ``plan`` command prints it and stops.
``describe(module, optimizer)`` renders its first tables, the parameter groups and the blocks, for any
module and optimizer without a ``Trainer`` (``print(describe(self, optimizer))`` in your own
``configure_optimizers``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import nn

from finetune.display import human, table
from finetune.memory import BACKWARD_FACTOR, activation_bytes, estimate_memory, resident_bytes
from finetune.parallel.placement import Placement, is_sharded
from finetune.parallel.placement import from_trainer as placement_of

if TYPE_CHECKING:
    from finetune.callbacks.unfreeze import GradualUnfreezing

log = logging.getLogger(__name__)


def run_plan(trainer: pl.Trainer, module: pl.LightningModule, placement: Placement | None = None) -> str:
    """The plan as text: the task (``describe_task`` of finetune tasks), parameter groups, blocks,
    accumulation and schedule, memory estimate per device, and for image data how images are prepared.

    ``placement`` (default: the trainer's own) says over how many processes what is sharded; the ``plan``
    command passes the recipe's, since it builds everything on one device.
    """
    placement = placement or placement_of(trainer)
    describe_task = getattr(module, "describe_task", None)
    unfreezing = _unfreezing(trainer)
    sections = [
        ("Task", describe_task() if callable(describe_task) else ""),
        ("Parameter groups", groups_table(trainer.optimizers)),
        ("Blocks (bottom to top)", blocks_table(trainer.optimizers, module, unfreezing)),
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


def describe(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    unfreezing: GradualUnfreezing | None = None,
) -> str:
    """The plan's parameter groups and blocks for ``module`` (a finetune task, your ``LightningModule``, a
    timm / Hugging Face network) and its ``optimizer`` (or several), as printable text; with
    ``unfreezing``, when each block opens. Blocks are laid out as ``finetune.optim.param_groups`` lays
    them out (``finetune.optim.network``)."""
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    sections = [
        ("Parameter groups", groups_table(optimizers)),
        ("Blocks (bottom to top)", blocks_table(optimizers, module, unfreezing)),
    ]
    return "\n\n".join(f"{title}\n{body}" for title, body in sections if body)


def groups_table(optimizers: Sequence[torch.optim.Optimizer]) -> str:
    """One row per optimizer group: its name (finetune's groups), size, LR at the start and now, weight decay,
    and the blocks it covers."""
    rows = []
    for optimizer in optimizers:
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


def blocks_table(
    optimizers: Sequence[torch.optim.Optimizer],
    module: nn.Module,
    unfreezing: GradualUnfreezing | None = None,
) -> str:
    """Trainable (in the optimizer) vs frozen parameters per block; when each block opens. Empty when
    ``module`` has no network to lay out."""
    from finetune.errors import RecipeError
    from finetune.optim.groups import level_label, parameter_levels
    from finetune.optim.network import model_layout

    try:
        model, layout = model_layout(module, unfreezing.module if unfreezing is not None else None)
    except RecipeError as error:
        log.debug("no blocks to show: %s", error)
        return ""
    in_optimizer = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    levels = parameter_levels(model, layout)
    counts: dict[int, list[int]] = {}
    for name, parameter in model.named_parameters():
        entry = counts.setdefault(levels[name], [0, 0])
        entry[0 if id(parameter) in in_optimizer else 1] += parameter.numel()
    opens = _opening(unfreezing, optimizers, module) if unfreezing is not None else {}
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


def _unfreezing(trainer: pl.Trainer) -> GradualUnfreezing | None:
    from finetune.callbacks.unfreeze import GradualUnfreezing

    return next((c for c in trainer.callbacks if isinstance(c, GradualUnfreezing)), None)


def _opening(
    unfreezing: GradualUnfreezing, optimizers: Sequence[torch.optim.Optimizer], module: nn.Module
) -> dict[str, str]:
    """Block -> the epoch/step it opens at, from the callback's milestones."""
    order = unfreezing.blocks(list(optimizers), module)
    return {block: unfreezing.opens_at(i) or "never" for i, block in enumerate(order)}


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
    resident = resident_bytes() if module.device.type == "cpu" else None  # before the probe's forward
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
        ("activations saved for backward (one micro-batch)", activations),
        (f"backward working memory ({BACKWARD_FACTOR:g}x the saved activations)", estimate.backward),
    ]
    teacher = _teacher_bytes(trainer)
    if teacher:
        rows.append(("distillation teacher (frozen, whole on every device)", teacher))
    memory_rows = getattr(module, "memory_rows", None)
    held = memory_rows() if callable(memory_rows) else []
    rows += held
    if resident is not None:
        # On CPU the process's libraries and data share the memory with training: what is resident now,
        # less the weights, teacher and task's models it already holds.
        loaded = estimate.weights + teacher + sum(size for _, size in held)
        rows.append(("libraries and data in this process (measured now)", max(resident - loaded, 0)))
    rows.append(("total", sum(size or 0 for _, size in rows)))
    lines = [[name, human(size)] for name, size in rows]
    return f"{placement.describe()}\n" + table([f"precision {precision}", "bytes"], lines)


def _teacher_bytes(trainer: pl.Trainer) -> int:
    """Bytes of a distillation teacher's weights: not sharded, so every process holds all of it."""
    from finetune.distill import Distillation

    teachers = [c.teacher for c in trainer.callbacks if isinstance(c, Distillation) and c.teacher is not None]
    return sum(p.numel() * p.element_size() for t in teachers for p in t.model.parameters())


def _probe_activations(trainer: pl.Trainer, module: pl.LightningModule, precision: str) -> int | None:
    """Activation bytes of one training micro-batch through ``module(batch)``; None if that cannot run.

    The forward runs on the batch's first ``PROBE_ROWS`` rows (same padded length) and is scaled to the
    whole batch: saved activations grow linearly with the rows, and a full-batch probe cost seconds of
    start-up and a transient peak as large as a training step's.
    """
    loader = trainer.train_dataloader
    if loader is None or is_sharded(module):
        # A sharded forward is a collective; the plan runs on rank 0 alone (the plan command measures it).
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # fetching a shuffled batch draws from the RNG
            batch = next(iter(loader))
        rows = _rows(batch)
        probe_rows = min(rows, PROBE_ROWS) if rows else None
        if probe_rows:
            batch = _first_rows(batch, rows, probe_rows)
        batch = trainer.strategy.batch_to_device(batch)
        saved = activation_bytes(module, lambda: module(batch), precision, module.device)
    except (
        TypeError,
        RuntimeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
        StopIteration,
    ) as error:
        log.debug("activation probe failed: %s", error)
        return None
    return saved * rows // probe_rows if probe_rows else saved


PROBE_ROWS = 2


def _rows(batch: object) -> int | None:
    """The batch's row count: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    )
    return next((rows for rows in map(_rows, values) if rows), None)


def _first_rows(batch: object, rows: int, keep: int) -> object:
    """``batch`` with every tensor of ``rows`` rows cut to its first ``keep`` (other values as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[:keep] if batch.dim() and batch.shape[0] == rows else batch
    if isinstance(batch, Mapping):
        return {key: _first_rows(value, rows, keep) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        values = [_first_rows(value, rows, keep) for value in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)  # a namedtuple
    return batch
