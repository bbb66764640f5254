"""The scripts' persistent compilation cache: a first process stores its executables, a second
reads them back (jax's cache-hit events), and the flags turn it off or move it."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from kvrm_jax import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, sys
import jax, jax.numpy as jnp
from jax import monitoring
from kvrm_jax import compile_cache
from kvrm_jax.step.sampling import sample

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
folder = compile_cache.from_args(compile_cache_args)
b, v = 2, 300
tok = jax.jit(sample)(jnp.zeros((b, v)), jnp.ones(b), jnp.zeros(b, jnp.int32), jnp.full(b, 0.9),
                      jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32))
tok.block_until_ready()
print(json.dumps({"folder": str(folder), "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def run_child(argv, env_extra):
  code = ("import argparse\nfrom kvrm_jax import compile_cache\np = argparse.ArgumentParser()\n"
          f"compile_cache.add_args(p)\ncompile_cache_args = p.parse_args({argv!r})\n" + CHILD)
  env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout.strip().splitlines()[-1])


def files_under(folder):
  return sum(len(fs) for _, _, fs in os.walk(folder))


def test_second_process_hits_the_cache(tmp_path):
  env = {"KVRM_JAX_CACHE": str(tmp_path / "cache"), "KVRM_JAX_COMPILE_CACHE": ""}
  first = run_child([], env)  # default folder: <cache>/xla
  folder = tmp_path / "cache" / "xla"
  assert first["folder"] == str(folder) and first["misses"] >= 1
  stored = files_under(folder)
  assert stored >= 1
  second = run_child([], env)
  assert second["hits"] >= first["misses"] and second["misses"] == 0
  assert files_under(folder) == stored  # nothing new compiled

  other = tmp_path / "elsewhere"
  moved = run_child(["--compile-cache", str(other)], env)
  assert moved["folder"] == str(other) and moved["misses"] >= 1 and files_under(other) >= 1


def test_off_by_flag_or_env(tmp_path):
  env = {"KVRM_JAX_CACHE": str(tmp_path / "cache"), "KVRM_JAX_COMPILE_CACHE": ""}
  off = run_child(["--no-compile-cache"], env)
  assert off["folder"] == "None" and not (tmp_path / "cache").exists()
  off = run_child([], dict(env, KVRM_JAX_COMPILE_CACHE="off"))
  assert off["folder"] == "None" and not (tmp_path / "cache").exists()


def test_unusable_folder_is_one_clear_error(tmp_path):
  (tmp_path / "file").write_text("x")
  p = argparse.ArgumentParser()
  compile_cache.add_args(p)
  with pytest.raises(compile_cache.UserError, match="cannot create the compilation cache folder"):
    compile_cache.from_args(p.parse_args(["--compile-cache", str(tmp_path / "file" / "sub")]))
