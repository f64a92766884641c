"""``trainer.strategy: fsdp2``: sharded data parallelism with torch's FSDP2 (``fully_shard``) through
Lightning's ``ModelParallelStrategy``.

Lightning's strategy owns the processes, the device mesh, the checkpoints and the optimizer; this subclass only
decides how a finetune task is sharded: one FSDP unit per block of the task's layout (the same blocks that
``partial``, layer-wise LR decay and gradual unfreezing use; timm's ``group_matcher`` groups or a Hugging Face
model's repeated layers), then the rest of the model as the root unit, and the modules that loss terms train
(a distillation projection) as a unit of their own. Every process holds ``1 / world_size`` of the weights,
gradients and optimizer state. Tensor parallelism is out of scope (``tensor_parallel_size`` is 1).

Adapters are injected before sharding (the fine-tuning strategy runs in ``configure_model``), so frozen base
weights and trainable adapters share a unit; FSDP2 shards each parameter on its own and keeps
``requires_grad`` per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from typing_extensions import override

from finetune.errors import RecipeError

KEY = "trainer.strategy"
NAME = "fsdp2"
REDUCED_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """Shard a finetune task over every process with FSDP2 (see the module docstring).

    Args:
        activation_checkpointing: recompute each block's activations during backward instead of keeping them
            (Hugging Face ``gradient_checkpointing_enable``, timm ``set_grad_checkpointing``; non-reentrant,
            so adapters on frozen blocks still get gradients).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory, moved to the GPU
            per unit when needed (GPU only).
        mixed_precision: ``bf16`` or ``fp16``: gather parameters and compute in that dtype, reduce gradients
            in float32; the sharded master weights stay in their own dtype. Keep ``trainer.precision`` at
            ``32-true`` with it. None (default): compute in the parameters' dtype.
        reshard_after_forward: free each unit's gathered parameters after its forward and gather them again in
            backward (least memory, ZeRO-3 style); false keeps them until backward (less communication).
        save_distributed_checkpoint: each process writes its shard into a checkpoint folder (default); false
            gathers the full state on rank 0 into one file.
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: how long collectives wait.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        mixed_precision: Literal["bf16", "fp16"] | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        if mixed_precision is not None and mixed_precision not in REDUCED_PRECISIONS:
            raise RecipeError(f"{KEY}.mixed_precision", f"{mixed_precision!r} is not bf16 or fp16")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding = Sharding(
            activation_checkpointing, cpu_offload, mixed_precision, reshard_after_forward
        )

    @override
    def setup_environment(self) -> None:
        # Every process is one data-parallel shard (Lightning's "auto" would split them into tensor parallelism).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        shard_task(self.lightning_module, self.device_mesh["data_parallel"], self.sharding)
        super().setup(trainer)


@dataclass(frozen=True)
class Sharding:
    """How ``shard_task`` applies FSDP2 (``FSDP2Strategy``'s arguments of the same names)."""

    activation_checkpointing: bool = False
    cpu_offload: bool = False
    mixed_precision: Literal["bf16", "fp16"] | None = None
    reshard_after_forward: bool = True

    def fully_shard_options(self) -> dict[str, Any]:
        """Keyword arguments for every ``fully_shard`` call."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        dtype = REDUCED_PRECISIONS.get(self.mixed_precision or "")
        return {
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None
            ),
            "offload_policy": CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy(),
        }


def shard_task(module: pl.LightningModule, mesh: Any, sharding: Sharding) -> None:
    """Apply FSDP2 to a finetune task: each layout block, then the model, then the loss-term modules.

    A module that is already sharded (a user's ``configure_model`` called ``fully_shard``) is left as it is.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    from finetune.tasks import FinetuneTask

    if any(isinstance(m, FSDPModule) for m in module.modules()):
        return
    if not isinstance(module, FinetuneTask):
        raise RecipeError(
            KEY,
            f"fsdp2 shards finetune tasks by their blocks; {type(module).__name__} is not one: call fully_shard "
            "in its configure_model and use lightning's ModelParallelStrategy",
        )
    check_quantisation(module.strategy)
    options = sharding.fully_shard_options()
    if sharding.activation_checkpointing:
        checkpoint_activations(module.model)
    model = module.model
    for block in module.layout.blocks:
        for name in block:
            fully_shard(model.get_submodule(name), mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    # Methods other than forward that the tasks call on the root (timm features, generation) gather too.
    for method in ("forward_features", "forward_head", "generate"):
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    if any(True for _ in module.loss_modules.parameters()):
        fully_shard(module.loss_modules, mesh=mesh, **options)


def check_quantisation(strategy: Any) -> None:
    """FSDP shards a block's parameters together, so 4-bit weights must be stored in the compute dtype, and
    8-bit (LLM.int8) weights cannot be sharded at all."""
    from finetune.strategies import QLoRA

    if not isinstance(strategy, QLoRA):
        return
    if strategy.bits == 8:
        raise RecipeError(
            "model.strategy.bits", "8-bit weights cannot be sharded by fsdp2; use bits: 4, or ddp"
        )
    if strategy.quant_storage != strategy.compute_dtype:
        raise RecipeError(
            "model.strategy.quant_storage",
            f"fsdp2 shards 4-bit weights only when they are stored in the compute dtype; set quant_storage: "
            f"{strategy.compute_dtype} (now {strategy.quant_storage})",
        )


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in backward, through the model family's own switch."""
    if hasattr(model, "gradient_checkpointing_enable"):  # Hugging Face
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    elif hasattr(model, "set_grad_checkpointing"):  # timm
        model.set_grad_checkpointing(True)
    else:
        raise RecipeError(
            f"{KEY}.activation_checkpointing",
            f"{type(model).__name__} has no activation checkpointing switch",
        )


if NAME not in StrategyRegistry:
    StrategyRegistry.register(
        NAME, FSDP2Strategy, description="FSDP2 (fully_shard) over every finetune block"
    )
