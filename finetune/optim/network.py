"""Which part of a module is the pretrained network, and the layout of any module around it.

finetune's tasks know their model and its layout (``FinetuneTask.model``, ``.layout``). Your own
``LightningModule`` holds its pretrained network as an attribute (``self.net = timm.create_model(...)``):
``network`` finds it, by name or as the child holding most of the parameters, and ``module_layout`` lays
the whole module out around it: the network's blocks (timm's ``group_matcher``, Hugging Face's repeated
layers: ``finetune.backbones.layout.discover_layout``) and, as the head, the network's own head plus
everything else the module holds (a head of yours, loss-term modules), which trains from the start.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from finetune.backbones.layout import Layout, discover_layout
from finetune.errors import RecipeError

Family = Literal["timm", "hf"]


def network_family(network: nn.Module) -> Family | None:
    """``timm`` or ``hf`` (a ``transformers`` model) when ``network`` is one of theirs, else None."""
    homes = {cls.__module__.partition(".")[0] for cls in type(network).__mro__}
    if "timm" in homes and callable(getattr(network, "get_classifier", None)):
        return "timm"
    if "transformers" in homes and hasattr(network, "base_model_prefix"):
        return "hf"
    return None


def network_head(network: nn.Module) -> tuple[str, ...]:
    """The names of the head modules of a timm or Hugging Face ``network``; none for a bare base model
    (timm ``num_classes=0``, ``AutoModel``) or another module."""
    family = network_family(network)
    if family == "timm":
        classifier = network.get_classifier()
        if not any(True for _ in classifier.parameters()):
            return ()
        return tuple(name for name, module in network.named_modules() if module is classifier)
    if family == "hf" and network.base_model is not network:
        from finetune.backbones.hf import HFLoader

        return HFLoader._head(network)
    return ()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(module: nn.Module) -> str:
    children = sorted(module.named_children(), key=lambda child: -_count(child[1]))
    return ", ".join(f"{name} ({_count(child):,} parameters)" for name, child in children) or "none"


def network(module: nn.Module, name: str | None = None, key: str = "module") -> tuple[str, nn.Module]:
    """The pretrained network in ``module`` and its name there: the submodule ``name`` (dots go deeper),
    ``module`` itself when it is a timm or Hugging Face model, else the child holding more than half of
    the parameters. RecipeError at ``key``, listing the children, when there is no such module."""
    if name is not None:
        try:
            return name, module.get_submodule(name)
        except AttributeError:
            raise RecipeError(
                key, f"{type(module).__name__} has no module {name!r}; its modules: {_candidates(module)}"
            ) from None
    if network_family(module) is not None:
        return "", module
    children = list(module.named_children())
    total = _count(module)
    largest = max(children, key=lambda child: _count(child[1]), default=None)
    if largest is None or 2 * _count(largest[1]) <= total:
        raise RecipeError(
            key,
            f"cannot tell which module of {type(module).__name__} is the pretrained network (none holds most "
            f"parameters); name it, one of: {_candidates(module)}",
        )
    return largest


def module_layout(module: nn.Module, name: str | None = None, key: str = "module") -> Layout:
    """The layout of ``module`` (parameter names relative to it): its network's blocks, and as the head the
    network's head plus every other child and parameter of ``module``."""
    prefix, found = network(module, name, key)
    inner = discover_layout(found, network_head(found))
    if not prefix:
        return inner

    def under(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f"{prefix}.{n}" for n in names)

    return Layout(
        blocks=tuple(under(block) for block in inner.blocks),
        head=under(inner.head) + _beside(module, prefix),
        new_head=inner.new_head,
    )


def _beside(module: nn.Module, path: str) -> tuple[str, ...]:
    """The children and parameters met along ``path`` that do not lead to it: all of ``module`` but it."""
    names: list[str] = []
    current, here = module, ""
    for part in path.split("."):
        local = [n for n, _ in current.named_children() if n != part]
        local += [n for n, _ in current.named_parameters(recurse=False)]
        names += [f"{here}{n}" for n in local]
        current, here = current.get_submodule(part), f"{here}{part}."
    return tuple(names)


def model_layout(module: nn.Module, name: str | None = None, key: str = "module") -> tuple[nn.Module, Layout]:
    """The model whose parameters are laid out, and its layout: a finetune task's own ``model`` and
    ``layout``, else ``module`` itself around its network (``module_layout``)."""
    model, layout = getattr(module, "model", None), getattr(module, "layout", None)
    if isinstance(model, nn.Module) and isinstance(layout, Layout):
        return model, layout
    return module, module_layout(module, name, key)
