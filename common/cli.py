"""What every entry point does with a user error: one line naming the problem, exit status 2.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return exit_status(lambda: run(args))

Only `common.errors.UserError` is caught: anything else (a bug, a failure inside torch or
megatron-core) propagates with its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import UserError


def exit_status(body: Callable[[], int]) -> int:
    """Runs a tool's body; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return body()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
