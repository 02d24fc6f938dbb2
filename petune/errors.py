"""Errors meant for people. The CLI prints them without a traceback.

UserError (exit 2): the recipe, the data, the arguments or the environment is wrong,
and the message says what, where and what to do. Anything else is a petune bug (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix. `where` is a file, file:line or dotted key."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RecipeError(UserError):
    """A recipe that cannot be used as written (syntax, unknown key, bad value)."""


class DataError(UserError):
    """A data file that cannot be read or does not fit the task."""


class Refusal(UserError):
    """A strategy × task × model mix that cannot work, refused before anything loads."""


class PluginError(UserError):
    """A plugin failed to load, register or run; names the plugin and its package."""
