"""RuntimeConfig.matmul: which GEMMs the steps run (kvrm_jax/step/gemm.py). The Mosaic kernel needs
a Hopper GPU; here its jnp twin (same plan arithmetic) stands in for it, so these tests check the
routing: every projection and the LM head of a step with at most 256 rows go through the kernel,
larger calls and float32 stay on XLA, and the results match XLA's."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import TINY, random_prompts

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.step import gemm
from pallas_kernels import skinny_matmul as sm


@pytest.fixture
def twin(monkeypatch):
  """The kernel replaced by its jnp twin; records the (rows, K, N) of every call."""
  calls = []

  def fake(x, w, plan=None, out_dtype=None):
    calls.append((x.shape[0], x.shape[1], w.shape[1]))
    return sm.reference(x, w, plan or sm.choose_plan(x.shape[0], x.shape[1], w.shape[1]), out_dtype)

  monkeypatch.setattr(sm, "skinny_matmul_mgpu", fake)
  monkeypatch.setattr(gemm, "kernel_available", lambda: True)
  return calls


def test_unknown_matmul_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown matmul 'cublas'"):
    RuntimeConfig(matmul="cublas")


def test_skinny_without_a_hopper_gpu_is_one_clear_error(monkeypatch):
  """The error names the device the process runs on (told it is no Hopper GPU, so a GPU run checks
  the message too)."""
  monkeypatch.setattr(gemm, "kernel_available", lambda: False)
  dev = jax.devices()[0]
  where = "cpu" if dev.platform == "cpu" else f"{dev.platform} ({dev.device_kind})"
  with pytest.raises(ValueError, match=r"^matmul 'skinny' runs a Mosaic GPU kernel that needs a Hopper GPU .*"
                     rf"this process runs on {re.escape(where)}: use matmul 'xla'$"):
    Engine(TINY, Llama(TINY, rngs=nnx.Rngs(0)), RuntimeConfig(matmul="skinny"))


def test_default_is_xla():
  assert gemm.projection_matmul(RuntimeConfig()) is gemm.xla_matmul
  assert gemm.projection_matmul(RuntimeConfig(matmul="skinny")) is gemm.skinny_matmul


def _forward(model, t, matmul):
  tokens = jnp.arange(t, dtype=jnp.int32) % TINY.vocab_size
  positions = jnp.arange(t, dtype=jnp.int32)

  def attend(layer, q, k, v, cache):  # causal attention over the call's own tokens
    from kvrm_jax.model.llama import attention
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    o = attention(q[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], mask)
    return o[0].astype(q.dtype), cache

  logits, _ = model(tokens, positions, None, attend, unroll=True, matmul=matmul)
  return logits


def test_skinny_routes_every_projection_and_the_head(twin):
  model = Llama(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  want = _forward(model, 40, gemm.xla_matmul)
  got = _forward(model, 40, gemm.skinny_matmul)
  d, f, e = TINY.hidden_size, TINY.intermediate_size, TINY.head_dim
  qkv = (TINY.num_heads + 2 * TINY.num_kv_heads) * e
  per_layer = [(40, d, qkv), (40, TINY.num_heads * e, d), (40, d, 2 * f), (40, f, d)]
  assert twin == per_layer * TINY.num_layers + [(40, d, TINY.vocab_size)]
  assert got.dtype == want.dtype == jnp.float32  # the head keeps f32 logits
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert err < 2e-2, err


def test_skinny_leaves_large_calls_and_float32_to_xla(twin):
  model = Llama(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  _forward(model, 264, gemm.skinny_matmul)  # over 256 rows: a prefill chunk
  assert twin == []
  _forward(Llama(TINY, rngs=nnx.Rngs(0)), 8, gemm.skinny_matmul)  # float32
  assert twin == []


@pytest.mark.parametrize("step_tokens", [0, 24])
def test_engine_with_skinny_gemms_decodes_like_xla(twin, step_tokens):
  """bf16 engine, decode and prefill (or mixed) steps: the twin's tokens equal XLA's, one compile
  per step shape."""
  model = Llama(TINY, rngs=nnx.Rngs(0))
  rt = dict(block_size=8, num_blocks=96, max_slots=4, max_blocks_per_seq=16, prefill_buckets=(8, 32),
            dtype="bfloat16", step_tokens=step_tokens, tile=8)
  ps = random_prompts(3, (5, 17, 30))
  sp = [SamplingParams(max_new_tokens=12)] * 3
  outs = {}
  for mm in ("xla", "skinny"):
    eng = Engine(TINY, model, RuntimeConfig(**rt, matmul=mm))
    outs[mm] = [o.output_ids for o in eng.generate(ps, sp)]
    assert eng.compiles.decode == 1
  assert 4 in {c[0] for c in twin}  # the decode step's rows went through the kernel
  assert outs["skinny"] == outs["xla"]
