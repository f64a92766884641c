"""``qlora``: LoRA on a base loaded quantised by bitsandbytes (4-bit NF4 or 8-bit); Hugging Face models only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from typing_extensions import override

from finetune.backbones.layout import Layout
from finetune.dtypes import DTYPES, DtypeName
from finetune.errors import RecipeError, require
from finetune.strategies.adapters import is_quantised
from finetune.strategies.base import STRATEGIES
from finetune.strategies.lora import LoRA


@STRATEGIES.register("qlora")
@dataclass
class QLoRA(LoRA):
    """LoRA (every ``lora`` argument applies) on base weights quantised as they load.

    Args:
        bits: 4 (NF4/FP4 with ``quant_type``) or 8 (LLM.int8).
        quant_type: 4-bit data type: ``nf4`` (normal-float, the QLoRA paper's) or ``fp4``.
        double_quant: also quantise the 4-bit quantisation constants (about 0.4 bits per weight saved).
        compute_dtype: dtype 4-bit layers compute in, that the frozen non-quantised weights keep, and that a
            merged export is written in. ``float32`` on CPU; ``bfloat16`` on recent GPUs.
        quant_storage: the dtype 4-bit weights are packed into. ``uint8`` (default) on one device or under
            DDP; set it to ``compute_dtype`` to shard with ``fsdp2``, so every shard of a block holds one dtype
            (the QLoRA-on-FSDP recipe).
        gradient_checkpointing: recompute activations in backward to save memory (non-reentrant, so the
            adapters still get gradients through frozen inputs).
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DtypeName = "bfloat16"
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.bits in (4, 8), "model.strategy.bits", f"must be 4 or 8, got {self.bits}")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype]

    @override
    def load_options(self) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        if self.bits == 4:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=self.quant_type,
                bnb_4bit_use_double_quant=self.double_quant,
                bnb_4bit_compute_dtype=self.dtype,
                bnb_4bit_quant_storage=torch.uint8
                if self.quant_storage == "uint8"
                else DTYPES[self.quant_storage],
            )
        else:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        # Quantise straight onto the device Lightning builds the model on (the CPU when there is no GPU).
        device = torch.get_default_device()
        return {"quantization_config": quantization, "dtype": self.dtype, "device_map": {"": device}}

    @override
    def apply(self, model: nn.Module, layout: Layout) -> None:
        from peft import prepare_model_for_kbit_training

        if not is_quantised(model):
            raise RecipeError(
                "model.strategy", "the backbone did not load quantised; use lora for this model"
            )
        # Casts the frozen non-quantised weights (norms, embeddings) to float32 for stable training and,
        # with checkpointing, makes the embedding output require grad so the adapters receive gradients.
        prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes repacks 4-bit weights in place for fast CPU inference on the first no-grad
                # eval forward (validation); the packed layout has no backward, so training after it would
                # get silently wrong gradients. Keep the trainable layout.
                module.support_avx512bf16_for_cpu = False
        super().apply(model, layout)
