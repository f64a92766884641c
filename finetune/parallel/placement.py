"""Where a run's state lives: how many processes, and which of weights, gradients and optimizer state each
holds only a shard of. The run plan divides its memory estimate by it; it is read from a live ``Trainer`` or,
for ``python -m finetune plan``, from the recipe's ``trainer`` section before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Lightning strategy names and classes -> what they shard (weights, gradients, optimizer state).
FULL = (True, True, True)
GRADIENTS_AND_STATE = (False, True, True)
STATE = (False, False, True)
NOTHING = (False, False, False)
DEEPSPEED_STAGES = {1: STATE, 2: GRADIENTS_AND_STATE, 3: FULL}
FULLY_SHARDED_CLASSES = ("fsdp2strategy", "modelparallelstrategy", "fsdpstrategy")  # lower case


@dataclass(frozen=True)
class Placement:
    """``world_size`` processes; ``sharded`` says whether (weights, gradients, optimizer state) are split
    across them (each process holds ``1 / world_size``) or replicated. ``note`` explains an assumption."""

    strategy: str
    world_size: int = 1
    sharded: tuple[bool, bool, bool] = NOTHING
    note: str = ""

    def per_device(self, weights: int, gradients: int, state: int) -> tuple[int, int, int]:
        """Bytes per device of the three, from their totals."""
        return tuple(  # type: ignore[return-value]
            -(-size // self.world_size) if split else size
            for size, split in zip((weights, gradients, state), self.sharded)
        )

    def describe(self) -> str:
        what = [
            name for name, split in zip(("weights", "gradients", "optimizer state"), self.sharded) if split
        ]
        shards = f"{', '.join(what)} sharded over {self.world_size}" if what else "replicated on every device"
        return f"strategy {self.strategy}, {self.world_size} process(es): {shards}{self.note}"


def is_sharded(module: Any) -> bool:
    """True when some parameter of ``module`` is a shard (a DTensor: FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _sharding(strategy: str, stage: int | None) -> tuple[bool, bool, bool]:
    name = strategy.lower()
    if name.startswith("deepspeed"):
        if stage is None:  # deepspeed_stage_3_offload -> 3; plain "deepspeed" is Lightning's stage 2
            digits = [int(c) for c in name if c.isdigit()]
            stage = digits[0] if digits else 2
        return DEEPSPEED_STAGES.get(stage, GRADIENTS_AND_STATE)
    if name in ("fsdp", "fsdp2") or name.startswith("fsdp_") or name.endswith(FULLY_SHARDED_CLASSES):
        return FULL
    return NOTHING


def from_trainer(trainer: Any) -> Placement:
    """The placement of a live ``Trainer``."""
    strategy = trainer.strategy
    stage = (
        getattr(strategy, "config", {}).get("zero_optimization", {}).get("stage")
        if hasattr(strategy, "config")
        else None
    )
    name = type(strategy).__name__
    return Placement(name, trainer.world_size, _sharding(name, stage) if trainer.world_size > 1 else NOTHING)


def from_recipe(strategy: Any, devices: Any, num_nodes: Any) -> Placement:
    """The placement a recipe's ``trainer.strategy`` / ``devices`` / ``num_nodes`` ask for (strings, numbers
    or a ``{class_path, init_args}`` mapping, as parsed), without building anything."""
    note = ""
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    elif isinstance(devices, (list, tuple)):
        per_node = len(devices)
    else:
        per_node = 1
        note = f"; devices {devices!r} assumed 1: pass --trainer.devices=N for N per node"
    world = per_node * (num_nodes if isinstance(num_nodes, int) and num_nodes > 0 else 1)
    stage = None
    if isinstance(strategy, dict) or hasattr(strategy, "class_path"):
        mapping = strategy if isinstance(strategy, dict) else vars(strategy)
        init_args = mapping.get("init_args") or {}
        stage = (init_args if isinstance(init_args, dict) else vars(init_args)).get("stage")
        name = str(mapping.get("class_path", "")).rpartition(".")[2]
        if name == "DeepSpeedStrategy":
            name = "deepspeed"
    else:
        name = str(strategy or "auto")
    return Placement(name, world, _sharding(name, stage) if world > 1 else NOTHING, note)
