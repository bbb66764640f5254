"""What the command-line scripts share: user errors end as one `error: ...` line, exit code 2."""

from __future__ import annotations

import contextlib
import os
import sys
import time


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


@contextlib.contextmanager
def phase(what: str):
  """Print `<what> ... 1.2 s` on stderr when the phase ends (a terminal or a log alike)."""
  t0 = time.perf_counter()
  yield
  print(f"{what} ... {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def check_writable(path: str) -> None:
  """Raise UserError now if `path` cannot be written, rather than after a long run."""
  existed = os.path.exists(path)
  try:
    with open(path, "a", encoding="utf-8"):
      pass
  except OSError as e:
    raise UserError(f"cannot write {path}: {e.strerror or e}") from None
  if not existed:
    os.remove(path)
