"""The exception types for user-facing failures, and how the command line reports them.

The CLI catches `UserError`, prints its message on one line to stderr and exits with status 2 (no traceback): the
message must say which file / key is wrong and what to do. `TrainingStopped` (a diverging loss) exits with status 1,
also on one line. Internal invariants use `assert` instead.
"""

from __future__ import annotations

import errno
import sys


class UserError(ValueError):
    """Bad input from the user (a file, a config key, a CLI option)."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what was kept and what to try."""


def run_guarded(func, *args) -> int:
    """Call func(*args); turn the errors above into one line on stderr and an exit status."""
    try:
        func(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # atomic writes leave the previous file in place, so rerunning after freeing space loses nothing
        print(f"error: {exc.filename or 'output'}: {exc.strerror}; free some space and rerun (a training run "
              "continues from its last checkpoint with checkpoint.resume=latest)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
