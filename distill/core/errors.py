"""The base of errors that are the user's to fix (a file, a model name, a service): the CLI prints them as one line."""


class UserError(Exception):
    """Raised for problems the message fully explains; anything else is a bug and shows its traceback."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""
