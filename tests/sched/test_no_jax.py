"""The host half imports no JAX: every module of kvrm_jax.sched loads with jax blocked."""

import subprocess
import sys

from conftest import child_env

PROBE = """
import importlib, pkgutil, sys
for name in ("jax", "jaxlib", "flax"):
  sys.modules[name] = None  # any import of them now raises ImportError
import kvrm_jax.sched
mods = [m.name for m in pkgutil.iter_modules(kvrm_jax.sched.__path__, "kvrm_jax.sched.")]
for m in mods:
  importlib.import_module(m)
print(" ".join(sorted(mods)))
"""


def test_sched_modules_import_without_jax():
  env = child_env()
  p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  loaded = {m.rsplit(".", 1)[1] for m in p.stdout.split()}
  assert {"request", "slots", "scheduler", "pager", "static", "tier", "summaries", "stats"} <= loaded
