"""The one exception type for bad user input."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe value is wrong. ``key`` is the recipe key (``data.train``) and the message says the fix.

    The CLI prints it as one line and exits non-zero; the Python API lets it propagate.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")
