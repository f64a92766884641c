"""The one exception type for bad user input, and the two helpers every module raises it through."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe value is wrong. ``key`` is the recipe key (``data.train``) and the message says the fix.

    The CLI prints it as one line and exits non-zero; the Python API lets it propagate.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``RecipeError(key, message)`` unless ``condition`` holds."""
    if not condition:
        raise RecipeError(key, message)


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or its type name when the message is empty.

    Library errors (hub downloads, parsers, peft) carry long multi-line reports; one line of it is enough
    to place the problem in a ``RecipeError``.
    """
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
