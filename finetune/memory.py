"""Training-memory estimate per device: weights, gradients, optimizer state and activations.

Weights, gradients and optimizer state follow from the parameters, the precision and the optimizer.
Activations are measured, not modelled: one forward pass of a real micro-batch under the run's precision,
summing the tensors autograd saves for backward (``saved_tensors_hooks``), parameters excluded. The probe
leaves no trace: RNG and buffers (BatchNorm statistics) are restored, no gradient is produced. Backward
needs more than the saved tensors at its peak (the gradient flowing back through each saved tensor while it
is consumed, attention-score gradients, intermediates): that part is ``BACKWARD_FACTOR`` times the saved
bytes, a ratio measured by ``bench/memory.py`` (bench/RESULTS.md, "Memory estimate").
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

HALF_PRECISIONS = {"16-true": torch.float16, "bf16-true": torch.bfloat16}
AUTOCAST = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
BACKWARD_FACTOR = 1.4


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device; ``activations`` (saved for backward) is None when no batch could be probed."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int | None

    @property
    def backward(self) -> int | None:
        """Backward's working memory beside the saved activations, at its peak."""
        return None if self.activations is None else int(self.activations * BACKWARD_FACTOR)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_state
            + (self.activations or 0)
            + (self.backward or 0)
        )


def activation_bytes(
    module: nn.Module, forward: Callable[[], Any], precision: str, device: torch.device
) -> int:
    """Bytes of the tensors autograd saves during ``forward()`` (parameters excluded), under ``precision``."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        # Detached: a saved output that points back at its own grad_fn is a reference cycle, which kept
        # the probe's activations alive for the whole run (measured: +400-500 MiB peak RSS on MiniLM).
        return tensor.detach()

    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    dtype = AUTOCAST.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), autocast:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
    del output
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
    return sum(saved.values())


def estimate_memory(
    module: nn.Module, precision: str, state_bytes_per_element: float, activations: int | None
) -> MemoryEstimate:
    """The estimate for ``module`` as it will train (``requires_grad`` says what trains)."""
    half = HALF_PRECISIONS.get(precision)
    weights = gradients = trainable = 0
    for parameter in module.parameters():
        size = torch.finfo(half).bits // 8 if half is not None and parameter.is_floating_point() else None
        element = size or parameter.element_size()
        weights += parameter.numel() * element
        if parameter.requires_grad:
            gradients += parameter.numel() * element
            trainable += parameter.numel()
    # Optimizer state is kept in the parameters' dtype (fp32 unless the precision is "true" half).
    state = state_bytes_per_element * (0.5 if half is not None else 1.0)
    return MemoryEstimate(weights, gradients, int(trainable * state), activations)


def resident_bytes() -> int | None:
    """This process's resident memory now (None where psutil cannot tell)."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)
