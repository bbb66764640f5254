"""JAX's persistent compilation cache for the command-line tools (on by default there).

The compiled steps are stored under, first found: `--compile-cache DIR`, `$KVRM_JAX_COMPILE_CACHE`,
jax's own `$JAX_COMPILATION_CACHE_DIR`, else `<cache folder>/xla` (the cache folder of the bundled
model: `$KVRM_JAX_CACHE` or `~/.cache/kvrm-jax`). `--no-compile-cache` (or
`KVRM_JAX_COMPILE_CACHE=off`) turns it off, jax's own folder included. A second start with the same
model, runtime shapes, jax version and device compiles nothing: its executables are read back from
the folder. `from_args` also keeps each compiled step whole in the folder's `kvrm-executables/`
(kvrm_jax.exe_store), so such a start skips tracing and lowering the steps as well.

The library itself never turns the cache on: `enable` is called by `scripts/decode.py` and the
benchmark scripts at start-up, before anything is compiled.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import jax

from kvrm_jax.cli import UserError
from kvrm_jax.model.checkpoint import default_cache_dir
from kvrm_jax import exe_store

ENV = "KVRM_JAX_COMPILE_CACHE"
_threads = 1  # compile_all's XLA compiles at once (--compile-threads)


def _read_back() -> int:
  """Executables this process read back so far: from jax's persistent cache or the executable store."""
  return exe_store.jax_cache_hits + exe_store.hits


def compile_all(engine, log=None, threads: int | None = None, background: bool = False) -> None:
  """`engine.compile_all(threads, background)` for a warm-up (threads: default --compile-threads, else 1).
  log(line), if given, is told each executable compiled and its seconds (cold compiles of an 8B-shaped
  model take about a minute each on a GPU host; it stays set, so a later compile says so too), then
  the total and how many came from the cache; with `background`, also when the last one is in."""
  if log is not None:
    engine.on_compile = lambda name, s: log(f"compiled the {name} in {s:.1f} s")
  before = _read_back()
  count, secs = engine.compile_all(threads or _threads, background=background)
  if log is not None and count > 1:
    log(f"{count} executables compiled in {secs:.1f} s ({_read_back() - before} read back from the compilation "
        "cache)")
  pending = engine.compiles_pending
  if log is not None and pending:
    log(f"serving on these while {pending} more compile in the background")
    t0 = time.perf_counter()

    def done():  # in a thread of its own: tells when the last one is in, or that one failed
      if engine.wait_compiled():
        log(f"the other {pending} executables compiled in the background in {time.perf_counter() - t0:.1f} s")
      elif engine.warm_error is not None:
        e, n = engine.warm_error, engine.compiles_pending
        log(f"a background compile failed ({type(e).__name__}: {e}); the {n} step{'s' if n != 1 else ''} left "
            f"run{'s' if n == 1 else ''} in the larger executables compiled before")
    threading.Thread(target=done, name="kvrm-compile-log", daemon=True).start()


def default_dir() -> Path:
  """`$KVRM_JAX_COMPILE_CACHE` (unless `off`), else jax's configured folder
  (`$JAX_COMPILATION_CACHE_DIR`), else `<bundled model cache folder>/xla`."""
  v = os.environ.get(ENV)
  if v and v != "off":
    return Path(v)
  jax_dir = jax.config.jax_compilation_cache_dir
  return Path(jax_dir) if jax_dir else default_cache_dir() / "xla"


def enable(path=None) -> Path:
  """Store every compiled executable (no minimum compile time or size) under `path` (default:
  `default_dir()`), created if missing, and return the folder. Call before the first compile."""
  folder = Path(path) if path else default_dir()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create the compilation cache folder {folder}: {e}") from None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Defaults skip executables that compile in under a second; the small steps of a run add up.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


def add_args(p: argparse.ArgumentParser) -> None:
  """--compile-cache DIR / --no-compile-cache."""
  g = p.add_mutually_exclusive_group()
  g.add_argument("--compile-cache", metavar="DIR", help=f"persistent compilation cache folder (default: "
                 f"${ENV}, else the cache folder's xla/: $KVRM_JAX_CACHE or ~/.cache/kvrm-jax)")
  g.add_argument("--no-compile-cache", action="store_true", help=f"do not read or write compiled executables (also ${ENV}=off)")
  p.add_argument("--compile-threads", type=int, default=1, metavar="N",
                 help="warm-up: run XLA's compiles of the steps in N threads at once (default 1: one at a time)")


def from_args(args) -> Path | None:
  """`enable` unless --no-compile-cache; the folder used, or None when off. A folder that cannot
  be created is a `UserError` (one `error:` line from the tools). Also sets the warm-ups'
  --compile-threads."""
  global _threads
  threads = getattr(args, "compile_threads", 1)
  if threads < 1:
    raise UserError(f"--compile-threads must be at least 1, got {threads}")
  _threads = threads
  if args.no_compile_cache or (not args.compile_cache and os.environ.get(ENV) == "off"):
    jax.config.update("jax_enable_compilation_cache", False)  # also a folder set by jax's own variable
    exe_store.disable()
    return None
  try:
    folder = enable(args.compile_cache)
  except ValueError as e:
    raise UserError(str(e)) from None
  exe_store.enable(folder)  # whole compiled steps too: a start from the cache skips tracing them
  return folder
