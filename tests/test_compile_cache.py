"""The scripts' persistent compilation cache: a first process stores its executables, a second
reads them back (jax's cache-hit events), and the flags turn it off or move it."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from conftest import child_env

from kvrm_jax import compile_cache

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
  env = child_env(**env_extra)
  env.pop("XLA_FLAGS", None)
  if "JAX_COMPILATION_CACHE_DIR" not in env_extra:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # e.g. set on a GPU machine: each test says what it wants
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


def test_off_by_flag_or_env_and_jax_own_folder(tmp_path):
  env = {"KVRM_JAX_CACHE": str(tmp_path / "cache"), "KVRM_JAX_COMPILE_CACHE": ""}
  off = run_child(["--no-compile-cache"], env)
  assert off["folder"] == "None" and not (tmp_path / "cache").exists()
  off = run_child([], dict(env, KVRM_JAX_COMPILE_CACHE="off"))
  assert off["folder"] == "None" and not (tmp_path / "cache").exists()
  # jax's own variable names the default folder, and the flag turns that off too
  jax_dir = tmp_path / "jax-own"
  used = run_child([], dict(env, JAX_COMPILATION_CACHE_DIR=str(jax_dir)))
  assert used["folder"] == str(jax_dir) and used["misses"] >= 1 and files_under(jax_dir) >= 1
  off = run_child(["--no-compile-cache"], dict(env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-off")))
  assert off["folder"] == "None" and off["hits"] == 0 and not (tmp_path / "jax-off").exists()


def test_unusable_folder_is_one_clear_error(tmp_path):
  (tmp_path / "file").write_text("x")
  p = argparse.ArgumentParser()
  compile_cache.add_args(p)
  with pytest.raises(compile_cache.UserError, match="cannot create the compilation cache folder"):
    compile_cache.from_args(p.parse_args(["--compile-cache", str(tmp_path / "file" / "sub")]))
