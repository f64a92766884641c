"""Where a model's parameters sit: its blocks (bottom to top) and its task head.

timm models publish their blocks through ``group_matcher`` (the grouping behind timm's own layer-wise
decay), so we use it. Other models (Hugging Face) are read structurally: the blocks are the instances of
the composite module class that, repeated, holds the most parameters (``BertLayer``, ``LlamaDecoderLayer``,
``ViTLayer``, GPT-2 ``Block``, T5's ``T5Block`` ...). An encoder-decoder (T5, BART) is read as two stacks, the
encoder's blocks then the decoder's: over the whole model its two stacks, or its decoder layers alone
(larger than the encoder's, with their cross-attention), would win.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Layout:
    """A model's blocks in forward order (each block: the module names it spans) and its head modules.

    ``new_head`` is false when the head is pretrained (a causal LM's ``lm_head``) rather than created for
    the task, so adapter strategies leave it frozen.
    """

    blocks: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]
    new_head: bool = True

    def block_index(self, name: str) -> int | None:
        """Index of the block holding parameter or module ``name``, or None outside every block."""
        for i, block in enumerate(self.blocks):
            if any(within(name, module) for module in block):
                return i
        return None

    def in_head(self, name: str) -> bool:
        return any(within(name, head) for head in self.head)


def within(name: str, prefix: str) -> bool:
    """True when module or parameter ``name`` is ``prefix`` or lies under it (``a.b`` is within ``a``)."""
    return name == prefix or name.startswith(prefix + ".")


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _parts(module: nn.Module) -> Iterator[nn.Module]:
    """The children of ``module``, with those of plain containers in place of the containers."""
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            yield from _parts(child)
        else:
            yield child


def _is_composite(module: nn.Module) -> bool:
    """A block-like module: not a plain container, with at least two parts that hold parameters (a T5
    block holds its attention and feed-forward layers in one ``ModuleList``)."""
    if isinstance(module, _CONTAINERS):
        return False
    return sum(1 for part in _parts(module) if _n_params(part) > 0) >= 2


def structural_blocks(model: nn.Module, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Names of the repeated blocks of ``model`` in forward order; modules under ``exclude`` are ignored."""
    instances: dict[type, list[tuple[str, int]]] = defaultdict(list)
    for name, module in model.named_modules():
        if not name or any(within(name, skip) for skip in exclude) or not _is_composite(module):
            continue
        outer = instances[type(module)]
        if outer and within(name, outer[-1][0]):
            continue  # nested inside an instance of its own class: the outer one already counts
        outer.append((name, _n_params(module)))

    def coverage(kind: type) -> int:
        return sum(n for _, n in instances[kind])

    repeated = [kind for kind, found in instances.items() if len(found) >= 2]
    candidates = repeated or list(instances)
    if not candidates:
        return ()
    best = max(candidates, key=coverage)
    return tuple(name for name, _ in instances[best])


def _owners(group: list[str], every: list[str]) -> tuple[str, ...]:
    """The outermost modules whose parameters (out of ``every``) all lie in ``group``."""
    inside = set(group)
    owners: dict[str, None] = {}
    for name in group:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if all(other in inside for other in every if within(other, prefix)):
                owners[prefix] = None
                break
    return tuple(owners)


def timm_blocks(model: nn.Module, exclude: tuple[str, ...] = ()) -> tuple[tuple[str, ...], ...]:
    """timm's own fine-grained groups, minus the stem (first) group and the head; empty if unsupported."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return ()
    try:
        groups = list(group_parameters(model, model.group_matcher(coarse=False)).values())
    except NotImplementedError:
        return ()
    every = [name for name, _ in model.named_parameters()]
    blocks = []
    for names in groups[1:]:
        kept = [name for name in names if not any(within(name, skip) for skip in exclude)]
        if kept:
            blocks.append(_owners(kept, every))
    return tuple(blocks)


def encoder_decoder_stacks(model: nn.Module) -> tuple[str, ...]:
    """The module names of a Hugging Face encoder-decoder's encoder and decoder, in forward order; () for
    any other model."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ()
    names = {id(module): name for name, module in model.named_modules()}
    stacks = tuple(names.get(id(stack)) for stack in (model.get_encoder(), model.get_decoder()))
    return stacks if all(stacks) else ()


def discover_layout(model: nn.Module, head: tuple[str, ...], new_head: bool = True) -> Layout:
    """The layout of a model whose head modules are named ``head``."""
    blocks = timm_blocks(model, exclude=head) if type(model).__module__.startswith("timm.") else ()
    if not blocks:
        stacks = encoder_decoder_stacks(model)
        blocks = tuple(
            (f"{stack}.{name}",)
            for stack in stacks
            for name in structural_blocks(model.get_submodule(stack), exclude=_under(head, stack))
        )
    if not blocks:
        blocks = tuple((name,) for name in structural_blocks(model, exclude=head))
    return Layout(blocks=blocks, head=head, new_head=new_head)


def _under(names: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """``names`` that lie under module ``prefix``, relative to it."""
    return tuple(name[len(prefix) + 1 :] for name in names if name.startswith(prefix + "."))


def language_model_layout(model: nn.Module) -> Layout:
    """The layout of a language model whose head is its output embeddings (pretrained, not new)."""
    output = model.get_output_embeddings()
    head = tuple(name for name, module in model.named_modules() if module is output)
    return discover_layout(model, head, new_head=False)
