"""The one exception type for mistakes in user input.

The CLI catches `UserError`, prints its message on one line to stderr and exits with status 2 (no traceback): the
message must say which file / key is wrong and what to do. Internal invariants use `assert` instead.
"""


class UserError(ValueError):
    """Bad input from the user (a file, a config key, a CLI option)."""
