"""peft adapters inside a model (what ``lora``/``qlora`` inject): which parameters they own, saving them for plain peft, merging them away.

Models here had their adapters injected in place (``peft.inject_adapter_in_model``), so they are the
original ``nn.Module`` (HF or timm) with adapter children; no ``PeftModel`` wrapper. peft and
bitsandbytes are imported on first use.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

ADAPTER_NAME = "default"
# PeftModel keeps the adapted model under this prefix; adapter files written for it use the same keys.
PEFT_PREFIX = "base_model.model."


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def adapter_targets(model: nn.Module) -> list[str]:
    """Names of the modules that carry an adapter."""
    return [name for name, _ in _tuner_layers(model)]


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of every adapter parameter (``lora_A``, ``ia3_l`` ...).

    Everything else is either the frozen base or a fully trained module such as a new head.
    """
    names = []
    for module_name, module in _tuner_layers(model):
        for attribute in module.adapter_layer_names:
            for name, _ in getattr(module, attribute).named_parameters():
                names.append(f"{module_name}.{attribute}.{name}" if module_name else f"{attribute}.{name}")
    return names


def fully_trained_modules(model: nn.Module) -> list[str]:
    """Modules outside the adapters whose parameters train (a new head): peft's ``modules_to_save``."""
    adapters = set(adapter_parameter_names(model))
    owners = dict.fromkeys(
        name.rpartition(".")[0]
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and name not in adapters
    )
    return list(owners)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its base model inside the block: every adapted layer computes its base layer alone
    (peft's ``enable_adapters(False)`` on each injected tuner layer; no weights change, nothing is copied).

    On leaving, each layer is as it was and every parameter keeps the ``requires_grad`` it had (peft's
    re-enabling would set it on the active adapters). A model without adapters runs unchanged.
    """
    layers = [module for _, module in _tuner_layers(model)]
    disabled = [layer.disable_adapters for layer in layers]
    trainable = {parameter: parameter.requires_grad for layer in layers for parameter in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, disabled):
            layer.enable_adapters(not was_disabled)
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)


def is_quantised(model: nn.Module) -> bool:
    """True when some layer holds bitsandbytes 4-bit or 8-bit weights."""
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def save_adapter(model: nn.Module, directory: Path, base_model: str, root: str = "") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``PeftModel.from_pretrained(base, dir)``.

    Fully trained modules (the head) go in as peft ``modules_to_save``, so peft restores them too. With
    ``root``, the adapters of that submodule alone, named as in it (the base model of a
    ``PooledClassifier``, which peft loads on ``AutoModel``); what trains outside it is the caller's to save.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    prefix = f"{root}." if root else ""
    modules_to_save = [m[len(prefix) :] for m in fully_trained_modules(model) if m.startswith(prefix)]
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.modules_to_save = modules_to_save or None
    if prefix and isinstance(config.target_modules, (list, set, tuple)):
        config.target_modules = sorted(
            m[len(prefix) :] if m.startswith(prefix) else m for m in config.target_modules
        )
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    config.save_pretrained(str(directory))
    state = dict(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    parameters = dict(model.named_parameters())
    for module in modules_to_save:
        state.update({name: p for name, p in parameters.items() if name.startswith(prefix + module + ".")})
    tensors = {
        PEFT_PREFIX + name[len(prefix) :]: t.detach().cpu().contiguous()
        for name, t in state.items()
        if name.startswith(prefix)
    }
    save_file(tensors, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})


def dequantised_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model``, bitsandbytes weights dequantised, floats cast to ``dtype``."""
    from peft.utils.integrations import dequantize_module_weight

    state: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if type(tensor).__name__ in ("Params4bit", "Int8Params"):
                tensor = dequantize_module_weight(module)
            tensor = tensor.detach()
            state[prefix + name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and put the base layer back in its place (in place)."""
    for name, layer in _tuner_layers(model):
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if has_adapters(model):
        del model.peft_config
    return model


def merged_copy(model: nn.Module, unquantised_twin: Callable[[], nn.Module], dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with adapters merged, holding plain (unquantised) weights.

    Merging into 4-bit weights would round the result back to 4 bits, so a quantised model's weights are
    dequantised to ``dtype`` into ``unquantised_twin()`` (the same architecture and adapters, loaded
    without quantisation) and merged there. ``model`` itself is left as it is.
    """
    if not is_quantised(model):
        return merge_adapters(copy.deepcopy(model))
    twin = unquantised_twin()
    expected = twin.state_dict()
    state = dequantised_state(model, dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RuntimeError(f"the unquantised copy has weights the trained model lacks: {missing[:5]}")
    twin.load_state_dict({name: state[name] for name in expected})
    return merge_adapters(twin)


def adapter_summary(names: list[str]) -> str:
    """Adapter target names with block numbers folded (``layers.*.mlp.up_proj``), for the start-up report."""
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names))
