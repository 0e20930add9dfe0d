"""User-facing errors.

Every mistake a user can make (a missing file, a typo in a recipe, a checkpoint of the wrong
model) is raised as :class:`SegcliError` at the place it is detected. The CLI turns it into a
single line on stderr and exit code 2; internal bugs stay ordinary exceptions with tracebacks.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class SegcliError(Exception):
    """A problem with the user's input: what is wrong, where (file/key), and what to do."""

    def __init__(self, message: str, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A 'did you mean ...?' hint, or a list of the valid choices when nothing is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid: " + ", ".join(choices) if choices else "nothing is valid here"
