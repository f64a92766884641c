"""Resolve user-given paths, including files shipped inside installed Python packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from finetune.errors import RecipeError

PACKAGE_SCHEME = "pkg://"


def resolve_path(value: str | Path, key: str, must_exist: bool = True) -> Path:
    """Turn ``value`` into a local path; ``pkg://PACKAGE/rel/path`` points inside an installed package.

    Raises ``RecipeError`` naming ``key`` when the path (or the package) does not exist.
    """
    text = str(value)
    if text.startswith(PACKAGE_SCHEME):
        package, _, rel = text[len(PACKAGE_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(
                key, f"package {package!r} is not installed (pip install {package.replace('_', '-')})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        path = Path(text).expanduser()
    if must_exist and not path.exists():
        raise RecipeError(key, f"{text} does not exist; give an existing file or folder")
    return path


def is_local_path(value: str) -> bool:
    """True for ``pkg://`` paths and paths that exist on disk."""
    return value.startswith(PACKAGE_SCHEME) or Path(value).expanduser().exists()
