"""What the command-line scripts share: user errors end as one `error: ...` line, exit code 2."""

from __future__ import annotations

import sys


class UserError(Exception):
  """Bad arguments or inputs (a user mistake, never a traceback)."""


def run_main(fn, argv) -> int:
  """Call fn(argv); UserError becomes one `error:` line and exit code 2."""
  try:
    return fn(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
