"""Compiled steps stored whole, under a key kvrm-jax computes without tracing.

JAX's persistent compilation cache keys an executable on its lowered program, so a start that
finds every step there still traces and lowers each one first: on an H100 that was most of a
61 s start of the Llama-3-8B-shaped mixed-step engine from the cache (docs/step.md, "Start-up").
This store keeps each compiled step (`jax.experimental.serialize_executable`) in
`<compilation cache folder>/kvrm-executables/`, keyed on everything that decides the program
without building it: the kvrm_jax and pallas_kernels sources (a hash of every .py file), the jax
and jaxlib versions, the backend and its devices, `XLA_FLAGS`, jax's configuration, the model and
runtime configs, the engine's kind and options, and the shapes, dtypes and shardings of the
step's arguments. Any difference is a different key: the step is compiled as usual and stored.
Only a step compiled here is stored, not one that jax's own persistent cache supplied: serialized
again, such an executable lost code on CPU (a later start failed with `NOT_FOUND: Function ...
not found`), so the store fills when jax's cache misses too.

It is on wherever the command-line tools turn the compilation cache on (`compile_cache.from_args`)
and off for the library otherwise; `KVRM_JAX_EXE_STORE=off` turns it off everywhere. An entry
that cannot be read or loaded is compiled again (one warning) and removed, never used half-read. Only load
entries this machine wrote: loading an executable runs code from it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
import tempfile
import threading
from pathlib import Path

import jax

ENV = "KVRM_JAX_EXE_STORE"
SUBDIR = "kvrm-executables"
_VERSION = 1  # of the entries' format and key
_folder: Path | None = None
hits = 0  # steps this process loaded from the store
jax_cache_hits = 0  # executables this process read back from jax's persistent cache (its own event)
_warned = False
_JAX_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_compiling = threading.local()  # per thread: did jax's cache supply the executable being compiled?


def _on_event(event: str, **_) -> None:
  global jax_cache_hits
  if event == _JAX_CACHE_HIT:
    jax_cache_hits += 1
    if getattr(_compiling, "active", False):
      _compiling.from_jax_cache = True


jax.monitoring.register_event_listener(_on_event)


def enable(cache_folder) -> Path | None:
  """Store compiled steps under `cache_folder/kvrm-executables` (unless $KVRM_JAX_EXE_STORE is off);
  the folder used, or None."""
  global _folder
  _folder = None if os.environ.get(ENV) == "off" else Path(cache_folder) / SUBDIR
  return _folder


def disable() -> None:
  global _folder
  _folder = None


def active() -> bool:
  return _folder is not None


@functools.cache
def source_hash() -> str:
  """sha256 of every .py file of kvrm_jax and pallas_kernels (path and bytes)."""
  import kvrm_jax
  import pallas_kernels
  h = hashlib.sha256()
  for pkg in (kvrm_jax, pallas_kernels):
    root = Path(pkg.__file__).parent
    for f in sorted(root.rglob("*.py")):
      h.update(str(f.relative_to(root.parent)).encode())
      h.update(f.read_bytes())
  return h.hexdigest()


def _environment() -> tuple:
  import jaxlib
  dev = jax.devices()[0]
  config = sorted((k, repr(v)) for k, v in jax.config.values.items() if "cache" not in k)
  return (_VERSION, source_hash(), jax.__version__, jaxlib.__version__, dev.platform,
          getattr(dev.client, "platform_version", ""), tuple(d.device_kind for d in jax.devices()),
          os.environ.get("XLA_FLAGS", ""), tuple(config))


def key(*parts) -> str | None:
  """The store's key of a step described by `parts` (reprs of what decides it beyond the
  environment), or None when the store is off."""
  if _folder is None:
    return None
  return hashlib.sha256(repr((_environment(), parts)).encode()).hexdigest()


def load(k: str | None, devices):
  """The stored executable of key `k` on `devices` (a list), or None."""
  global hits
  if k is None or _folder is None:
    return None
  path = _folder / f"{k}.exe"
  if not path.exists():
    return None
  from jax.experimental import serialize_executable as se
  try:
    payload, in_tree, out_tree = pickle.loads(path.read_bytes())
    exe = se.deserialize_and_load(payload, in_tree, out_tree, execution_devices=list(devices))
  except Exception as e:  # noqa: BLE001  (a damaged or foreign entry: compile instead)
    _warn(f"could not load the stored executable {path.name} ({type(e).__name__}: {e}); compiling it again")
    path.unlink(missing_ok=True)  # once: the compile below may not replace it (see compile_and_save)
    return None
  with _lock:  # loads run in threads (Engine._load_stored)
    hits += 1
  return exe


def compile_and_save(k: str | None, lowered):
  """`lowered.compile()`, stored under key `k` unless jax's persistent cache supplied it (module
  docstring)."""
  if k is None or _folder is None:
    return lowered.compile()
  _compiling.active, _compiling.from_jax_cache = True, False
  try:
    exe = lowered.compile()
  finally:
    _compiling.active = False
  if not _compiling.from_jax_cache:
    save(k, exe)
  return exe


def save(k: str | None, exe) -> None:
  """Store `exe` under key `k` (written to a temporary file, then renamed: never read half-written).
  `exe` must be compiled in this process, not read from jax's cache: use compile_and_save."""
  if k is None or _folder is None:
    return
  from jax.experimental import serialize_executable as se
  try:
    blob = pickle.dumps(se.serialize(exe))
    _folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=_folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, _folder / f"{k}.exe")
  except Exception as e:  # noqa: BLE001  (the step runs all the same; the next start compiles it)
    _warn(f"could not store a compiled step ({type(e).__name__}: {e})")


def _warn(msg: str) -> None:
  global _warned
  with _lock:  # once per process, loads in threads included
    if _warned:
      return
    _warned = True
  print(f"warning: executable store: {msg}", file=sys.stderr, flush=True)
