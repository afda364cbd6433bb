"""Errors a user can act on: each message names the problem and the fix, on one line."""

from typing import Any


def first_line(text: Any, limit: int = 400) -> str:
    """The first line of an error's text, at most `limit` characters: what a user is shown."""
    lines = str(text).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def without_technique(technique: str, error: str) -> str:
    """The error without its leading "<technique>: ", where a line already names the technique."""
    prefix = f"{technique}: "
    return error[len(prefix):] if error.startswith(prefix) else error


class QuantLabError(Exception):
    """A problem with the user's input or environment; shown as one line, never as a traceback."""


class DatasetError(QuantLabError):
    """A dataset that cannot be loaded or does not fit the model."""


class ModelError(QuantLabError):
    """A model file that cannot be loaded safely, or a model a technique cannot handle."""


class TechniqueError(QuantLabError):
    """An unknown technique or a bad technique parameter."""


class StoreError(QuantLabError):
    """The results database cannot be opened or written."""
