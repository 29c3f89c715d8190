"""What every command-line tool does with bad input: one line naming the problem, exit status 2."""

from __future__ import annotations

import sys
from typing import Callable

# Raised by our code for inputs a user can fix (missing or existing paths, invalid files or values),
# each with a message naming the file, tensor or field.
INPUT_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


def exit_status(body: Callable[[], int]) -> int:
    """Runs a tool's body; an input error becomes `error: <message>` on stderr and exit status 2."""
    try:
        return body()
    except INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
