"""Optimizer parameter groups: a pure function from (model, layout, config) to a list of dicts.

``param_groups`` is also the one call to put in your own ``configure_optimizers``::

    def configure_optimizers(self):
        return torch.optim.AdamW(finetune.optim.param_groups(self, lr=1e-3, layer_decay=0.75))

It finds the module's pretrained network (``finetune.optim.network``) and its blocks itself.

Every trainable parameter gets a *level*: 0 for what sits below the first block (embeddings, stem), ``i + 1``
for block ``i`` of the layout, ``n_blocks + 1`` for the head and what sits above the last block (a final
norm, a pooler). A parameter under a block's module prefix takes that block's level, adapter parameters
(``...q_proj.lora_A.default.weight``) included. Groups are split by level, so a callback can address one
block's group by name (``group["block"]``) and the run plan can show which blocks each group covers.

Each dict holds ``params``, ``lr`` (absolute: Lightning never reads timm's ``lr_scale``) and ``weight_decay``
for torch, and ``name``, ``names`` (parameter names), ``level``, ``block`` and ``rule`` for us; torch
optimizers keep extra keys. Frozen parameters (``requires_grad=False``) are left out and left alone.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections import Counter
from dataclasses import replace
from typing import Any

from torch import nn

from finetune.backbones.layout import Layout
from finetune.optim.config import OPTIMIZER_KEY, OptimizerConfig, ParamGroup
from finetune.optim.network import model_layout

log = logging.getLogger(__name__)

STEM = "embeddings"
HEAD = "head"


def parameter_levels(model: nn.Module, layout: Layout) -> dict[str, int]:
    """Each parameter's level (see the module docstring); parameters between blocks take the block below."""
    top = len(layout.blocks) + 1
    named = [name for name, _ in model.named_parameters()]
    blocks = {name: layout.block_index(name) for name in named}
    positions = [i for i, name in enumerate(named) if blocks[name] is not None]
    first, last = (positions[0], positions[-1]) if positions else (len(named), -1)
    levels: dict[str, int] = {}
    current = 0
    for position, name in enumerate(named):
        if layout.in_head(name) or position > last:
            levels[name] = top
        elif blocks[name] is not None:
            current = levels[name] = blocks[name] + 1
        else:
            levels[name] = 0 if position < first else current
    return levels


def level_label(layout: Layout, level: int) -> str:
    """A level's display name: ``embeddings``, the block's module names, or ``head``."""
    if level == 0:
        return STEM
    if level > len(layout.blocks):
        return HEAD
    return "+".join(layout.blocks[level - 1])


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases, 0-d/1-d parameters (norm weights), embedding tables and what a model lists in its own
    ``no_weight_decay()`` (timm's; the outermost module that has one, so a timm network inside your
    ``LightningModule`` counts)."""
    names, own = set(), set()
    declared: list[str] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        listing = getattr(module, "no_weight_decay", None)
        if callable(listing) and not any(module_name.startswith(outer) for outer in declared):
            declared.append(prefix)
            own |= {prefix + name for name in listing()}
        for local, parameter in module.named_parameters(recurse=False):
            name = prefix + local
            if parameter.ndim <= 1 or local == "bias" or isinstance(module, nn.Embedding) or name in own:
                names.add(name)
    return names


def _matches(rule: ParamGroup, name: str) -> bool:
    if rule.syntax == "glob":
        return fnmatch.fnmatchcase(name, rule.pattern)
    return re.search(rule.pattern, name) is not None


def match_rules(names: list[str], rules: list[ParamGroup]) -> dict[str, int]:
    """Index of the first rule matching each name (names no rule matches are absent).

    Warns, by pattern, about rules that match nothing and about names several rules match (first wins).
    """
    first: dict[str, int] = {}
    hits: Counter[int] = Counter()
    overlaps: Counter[tuple[int, int]] = Counter()
    for name in names:
        matched = [i for i, rule in enumerate(rules) if _matches(rule, name)]
        hits.update(matched)
        if matched:
            first[name] = matched[0]
        for other in matched[1:]:
            overlaps[(matched[0], other)] += 1
    for i, rule in enumerate(rules):
        if not hits[i]:
            log.warning("%s.groups: pattern %r matches no trainable parameter", OPTIMIZER_KEY, rule.pattern)
    for (winner, loser), count in overlaps.items():
        log.warning(
            "%s.groups: %d parameters match both %r and %r; the first, %r, sets their LR",
            OPTIMIZER_KEY,
            count,
            rules[winner].pattern,
            rules[loser].pattern,
            rules[winner].pattern,
        )
    return first


def param_groups(
    model: nn.Module,
    layout: Layout | None = None,
    config: OptimizerConfig | None = None,
    *,
    module: str | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for the trainable parameters of ``model`` (see the module docstring).

    Args:
        model: a finetune task's model, or any module: your ``LightningModule`` (``self``) or a timm / Hugging
            Face network.
        layout: its blocks and head; default: found (``finetune.optim.network.model_layout``).
        config: the grouping rules (``OptimizerConfig``: ``lr``, ``weight_decay``, ``layer_decay``, ``groups``
            of per-pattern LRs, ``decay_norm_and_bias``); default: its defaults.
        module: where ``layout`` is found: the attribute of ``model`` holding the pretrained network;
            default: ``model`` itself when it is a timm / Hugging Face model, else the child holding most
            parameters.
        **overrides: ``OptimizerConfig`` fields replacing those of ``config``: ``param_groups(self, lr=1e-3,
            layer_decay=0.75)``.
    """
    config = config or OptimizerConfig()
    if overrides:
        config = replace(config, **overrides)
    if layout is None:
        model, layout = model_layout(model, module, key="param_groups.module")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    levels = parameter_levels(model, layout)
    top = len(layout.blocks) + 1
    exempt = set() if config.decay_norm_and_bias else no_decay_names(model)
    rule_of = match_rules([name for name, _ in trainable], config.groups)
    groups: dict[tuple, dict[str, Any]] = {}
    for name, parameter in trainable:
        level, index = levels[name], rule_of.get(name)
        rule = config.groups[index] if index is not None else None
        lr = config.lr * (config.layer_decay ** (top - level) if config.layer_decay else 1.0)
        if rule is not None and rule.lr is not None:
            lr = rule.lr
        weight_decay = 0.0 if name in exempt else config.weight_decay
        if rule is not None and rule.weight_decay is not None:
            weight_decay = rule.weight_decay
        key = (level, -1 if index is None else index, weight_decay == 0)
        if key not in groups:
            block = level_label(layout, level)
            label = block if rule is None else f"{block} [{rule.pattern}]"
            groups[key] = {
                "params": [],
                "names": [],
                "lr": lr,
                "weight_decay": weight_decay,
                "name": label + (" (no decay)" if weight_decay == 0 else ""),
                "level": level,
                "block": block,
                "rule": None if rule is None else rule.pattern,
            }
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]
