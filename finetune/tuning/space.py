"""A sweep's search space: recipe keys mapped to the values a trial may take.

The space file is YAML, one entry per recipe key, spelled as its command-line override names it::

    optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    optimizer.weight_decay: {type: float, low: 0.0, high: 0.1, step: 0.01}
    model.init_args.strategy.init_args.rank: {type: int, low: 4, high: 32, log: true}
    data.init_args.batch_size: {type: categorical, choices: [16, 32, 64]}

``float`` and ``int`` take ``low`` and ``high`` (both included) and either ``log: true`` (sampled on a log
scale, ``low`` > 0) or a ``step`` (the grid ``low, low + step, ...``); ``categorical`` takes a list of
``choices``: strings, numbers, booleans or null. Each entry becomes the Optuna distribution of the same name
(``suggest_float``, ``suggest_int``, ``suggest_categorical``), named by the key. Whether the key exists in the
recipe is checked where every key is: when the first trial's recipe is parsed.

Optuna is imported only when a trial samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from finetune.errors import require

SECTIONS = ("trainer", "model", "data", "optimizer", "lr_scheduler")
SEED = "seed_everything"
RANGE_FIELDS = frozenset({"type", "low", "high", "log", "step"})
FIELDS = {"float": RANGE_FIELDS, "int": RANGE_FIELDS, "categorical": frozenset({"type", "choices"})}
EXAMPLE = "optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}"


@dataclass(frozen=True)
class Dimension:
    """One recipe key of the space and the values a trial samples for it (see the module docstring)."""

    key: str
    kind: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna ``trial`` samples for this key."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def override(self, value: Any) -> str:
        """The command-line override setting this key to ``value`` (JSON, which the recipe parser reads as YAML)."""
        return f"--{self.key}={json.dumps(value)}"


def parse_space(space: Any, source: str = "the space file") -> list[Dimension]:
    """The dimensions of a loaded space file; ``RecipeError`` naming the space key (or ``--space``) otherwise.

    Args:
        space: the file's YAML, a mapping of recipe keys to ranges.
        source: how messages name the file.
    """
    require(
        isinstance(space, dict) and bool(space),
        "--space",
        f"{source} must map recipe keys to ranges, e.g. {EXAMPLE}",
    )
    return [_dimension(str(key), spec, f"in {source}") for key, spec in space.items()]


def _dimension(key: str, spec: Any, where: str) -> Dimension:
    section = key.split(".")[0]
    require(
        key == SEED or (section in SECTIONS and "." in key),
        key,
        f"{where}: not a recipe key; give one as its override names it ({', '.join(SECTIONS)}, e.g. optimizer.lr)",
    )
    require(
        isinstance(spec, dict), key, f"{where}: give a mapping such as {{type: float, low: ..., high: ...}}"
    )
    kind = spec.get("type")
    require(kind in FIELDS, key, f"{where}: type {kind!r} is not one of {', '.join(FIELDS)}")
    unknown = sorted(str(field) for field in set(spec) - FIELDS[kind])
    require(
        not unknown, key, f"{where}: {kind} takes {', '.join(sorted(FIELDS[kind]))}; not {', '.join(unknown)}"
    )
    if kind == "categorical":
        return _categorical(key, spec.get("choices"), where)
    return _range(key, kind, spec, where)


def _number(value: Any, integer: bool) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool)


def _range(key: str, kind: str, spec: dict[str, Any], where: str) -> Dimension:
    integer = kind == "int"
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    what = "integers" if integer else "numbers"
    require(_number(low, integer) and _number(high, integer), key, f"{where}: low and high must be {what}")
    require(low < high, key, f"{where}: low must be below high (got low={low}, high={high})")
    require(isinstance(log, bool), key, f"{where}: log must be true or false, got {log!r}")
    require(not (log and step is not None), key, f"{where}: give log or step, not both")
    require(not log or low > 0, key, f"{where}: a log scale needs low > 0 (got {low})")
    require(
        step is None or (_number(step, integer) and step > 0), key, f"{where}: step must be a positive {kind}"
    )
    return Dimension(key, kind, low=low, high=high, log=log, step=step)


def _categorical(key: str, choices: Any, where: str) -> Dimension:
    require(isinstance(choices, list) and bool(choices), key, f"{where}: categorical needs a list of choices")
    scalars = all(choice is None or isinstance(choice, (bool, int, float, str)) for choice in choices)
    require(
        scalars,
        key,
        f"{where}: choices must be strings, numbers, booleans or null (choose a strategy by its name)",
    )
    require(len({json.dumps(c) for c in choices}) == len(choices), key, f"{where}: a choice is given twice")
    return Dimension(key, "categorical", choices=tuple(choices))
