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


STORE_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from kvrm_jax import compile_cache
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax import exe_store

compile_cache.from_args(compile_cache_args)
lowered = []
_lower = Engine._lower
Engine._lower = lambda self, *a: lowered.append(1) or _lower(self, *a)
cfg = ModelConfig.from_name("tiny")
rt = RuntimeConfig(block_size=8, num_blocks=65, max_slots=SLOTS, max_blocks_per_seq=8, step_tokens=SLOTS + 32,
                   tile=16, pipeline=True, greedy_only=True, dtype="float32")
eng = Engine(cfg, Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), rt)
compile_cache.compile_all(eng, threads=THREADS)
rids = [eng.add_request(p, SamplingParams(max_new_tokens=6, ignore_eos=True)) for p in ([5, 6, 7], list(range(3, 40)))]
while eng.has_work():
  eng.step()
print(json.dumps({"lowered": len(lowered), "hits": exe_store.hits, "executables": len(eng._executables),
                  "tokens": [eng.requests[r].output_ids for r in rids]}))
"""


def run_store_child(tmp_path, slots=2, threads=1, **env_extra):
  code = ("import argparse\nfrom kvrm_jax import compile_cache\np = argparse.ArgumentParser()\n"
          "compile_cache.add_args(p)\ncompile_cache_args = p.parse_args([])\n"
          f"SLOTS, THREADS = {slots}, {threads}\n" + STORE_CHILD)
  env = child_env(**{"KVRM_JAX_CACHE": str(tmp_path / "cache"), "KVRM_JAX_COMPILE_CACHE": "",
                     "KVRM_JAX_EXE_STORE": "", **env_extra})
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr
  return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def test_a_start_from_the_executable_store_traces_nothing(tmp_path):
  """The scripts keep each compiled step whole (kvrm_jax.exe_store): a second process with the
  same model and runtime loads every step without tracing or lowering one (also with compile
  threads), and decodes the same tokens; another runtime compiles its own; a damaged entry is
  compiled again after one warning and removed; KVRM_JAX_EXE_STORE=off stores nothing; a step that
  jax's own cache supplied is not stored (on CPU it lost code when serialized again: the next start
  failed with NOT_FOUND)."""
  store = tmp_path / "cache" / "xla" / "kvrm-executables"
  first, _ = run_store_child(tmp_path)
  n = first["executables"]
  assert n >= 2 and first["lowered"] == n and first["hits"] == 0
  assert len(list(store.glob("*.exe"))) == n
  second, _ = run_store_child(tmp_path, threads=2)
  assert (second["lowered"], second["hits"], second["tokens"]) == (0, n, first["tokens"])
  other, _ = run_store_child(tmp_path, slots=3)
  assert other["lowered"] == other["executables"] and other["hits"] == 0
  for f in store.glob("*.exe"):
    f.write_bytes(b"not an executable")
  damaged, err = run_store_child(tmp_path)
  assert (damaged["lowered"], damaged["tokens"]) == (n, first["tokens"])
  assert err.count("warning: executable store: could not load") == 1, err
  # removed and not stored again from jax's cache; the other runtime's damaged entries were not read
  assert len(list(store.glob("*.exe"))) == other["executables"]
  after, err = run_store_child(tmp_path)
  assert (after["lowered"], after["tokens"]) == (n, first["tokens"]) and "warning" not in err, err
  off, _ = run_store_child(tmp_path / "off", KVRM_JAX_EXE_STORE="off")
  assert off["lowered"] == n and not (tmp_path / "off" / "cache" / "xla" / "kvrm-executables").exists()
  on, _ = run_store_child(tmp_path / "off")  # every step from jax's cache: nothing to store
  assert on["lowered"] == n and on["tokens"] == first["tokens"]
  assert not list((tmp_path / "off" / "cache" / "xla" / "kvrm-executables").glob("*.exe"))
