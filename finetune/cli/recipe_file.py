"""Read a recipe file before Lightning does, so a file that is not a recipe gets one line naming the file and
the place: not text, not YAML (with line and column), a key given twice, or not a mapping of sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finetune.errors import RecipeError

KEY = "--config"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (YAML lets the last one win silently)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} is given twice (first on line {first}); keep one",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe at ``path`` as a mapping; RecipeError (key ``--config``) naming the file and place otherwise."""
    if not path.is_file():
        raise RecipeError(KEY, f"recipe file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            KEY, f"{path} is not a text (UTF-8) file (byte {error.start}); give a YAML recipe"
        ) from None
    try:
        recipe = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(KEY, f"{where}: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise RecipeError(KEY, f"{path}: not YAML ({error})") from None
    if not isinstance(recipe, dict):
        kind = "empty" if recipe is None else f"a {type(recipe).__name__}"
        raise RecipeError(
            KEY, f"{path} is {kind}; a recipe is a mapping of sections (trainer, model, data, optimizer, ...)"
        )
    return recipe
