"""Errors a user can act on.

Anything raised as a `ForgebenchError` is printed by the CLI as one line (no
traceback unless `--debug`), so its message must say what is wrong, where, and
how to fix it.
"""


class ForgebenchError(Exception):
    """A failure the user can fix; the CLI prints it as one line."""

    exit_code = 1


class InputError(ForgebenchError):
    """What the user asked for cannot be read or found; nothing has run yet."""

    exit_code = 2


class SpecError(InputError):
    """The experiment spec is invalid."""


class StageError(ForgebenchError):
    """A stage of the chain failed for one cell."""
