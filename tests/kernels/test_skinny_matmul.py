# The weight-streaming skinny matmul (pallas_kernels/skinny_matmul.py). CPU: the plan rules, the
# jnp twin of the kernel's split arithmetic against x @ w, and that the Mosaic GPU kernel lowers for
# CUDA (lowering needs no GPU). GPU (marked `gpu`): the kernel against the twin and x @ w.

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import skinny_matmul as sm

ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU (on a GPU machine: make test-gpu)")

# Llama-3-8B projections (K, N): qkv, wo, gate_up, down
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def _xw(m, k, n, dtype=jnp.float32, seed=0):
  kx, kw = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(kx, (m, k), jnp.float32).astype(dtype),
          (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype))


@pytest.mark.parametrize("m", [1, 7, 8, 64, 148, 256])
@pytest.mark.parametrize("k,n", SHAPES)
def test_chosen_plan_fits_and_fills_the_gpu(m, k, n):
  plan = sm.choose_plan(m, k, n)
  plan.check(m, k, n)  # raises if it does not divide or over-fills shared memory
  assert sm.smem_bytes(plan, m) <= sm.MAX_SMEM_BYTES
  assert plan.stages >= 2  # a ring, so copies overlap the tensor-core work
  programs = n // plan.tile_n * plan.splits
  assert programs >= 132 or plan.splits == 8 or k % (plan.tile_k * plan.splits * 2)


@pytest.mark.parametrize("plan", [sm.GemmPlan(64, 1, 1, 2), sm.GemmPlan(128, 2, 4, 3),
                                  sm.GemmPlan(256, 1, 2, 2), sm.GemmPlan(64, 4, 8, 2)])
@pytest.mark.parametrize("m", [1, 5, 8, 24])
def test_reference_equals_x_at_w(plan, m):
  x, w = _xw(m, 1024, 512)
  want = jnp.dot(x, w, precision="highest")
  got = sm.reference(x, w, plan)
  assert got.shape == (m, 512) and got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_reference_bfloat16_close_to_float32():
  x, w = _xw(148, 2048, 256)
  want = jnp.dot(x, w, precision="highest")
  got = sm.reference(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), sm.choose_plan(148, 2048, 256))
  err = jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))
  assert float(err) < 2e-2


@pytest.mark.parametrize("m,k,n,plan,msg", [
    (0, 1024, 512, sm.GemmPlan(), "1 to 256 rows"),
    (257, 1024, 512, sm.GemmPlan(), "1 to 256 rows"),
    (8, 1024, 500, sm.GemmPlan(), "multiple of the 64-feature tile"),
    (8, 1024, 320, sm.GemmPlan(n_sub=4), "multiple of the 256-feature tile"),
    (8, 1000, 512, sm.GemmPlan(tile_k=128), "whole 128-steps"),
    (8, 1024, 512, sm.GemmPlan(tile_k=128, splits=16), "whole 128-steps"),
    (8, 1024, 512, sm.GemmPlan(tile_k=96), "tile_k must be"),
    (8, 1024, 512, sm.GemmPlan(stages=0), "stages must be"),
    (256, 4096, 512, sm.GemmPlan(tile_k=256, stages=8), "shared memory"),
])
def test_plans_that_do_not_fit_are_one_clear_error(m, k, n, plan, msg):
  with pytest.raises(ValueError, match=msg):
    plan.check(m, k, n)


def test_supported_only_for_half_types_and_divisible_shapes():
  assert sm.supported(jnp.bfloat16, 148, 4096, 6144)
  assert sm.supported(jnp.float16, 1, 14336, 4096)
  assert not sm.supported(jnp.float32, 148, 4096, 6144)
  assert not sm.supported(jnp.bfloat16, 300, 4096, 6144)
  assert not sm.supported(jnp.bfloat16, 8, 4096, 6100)
  assert not sm.supported(jnp.bfloat16, 8, 4000, 6144)


def test_mosaic_kernel_lowers_for_cuda():
  """The kernel's Mosaic GPU program builds (layouts, TMA boxes, barriers) without a GPU."""
  for m, plan in [(1, None), (148, None), (8, sm.GemmPlan(tile_k=256, n_sub=2, splits=2, stages=3))]:
    plan = plan or sm.choose_plan(m, 4096, 1024)
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)
    text = jax.jit(lambda x, w: sm.skinny_matmul_mgpu(x, w, plan)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 8, 37, 148, 256])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])
def test_gpu_kernel_matches_reference(m, k, n):
  x, w = _xw(m, k, n, jnp.bfloat16, seed=m)
  plan = sm.choose_plan(m, k, n)
  got = sm.skinny_matmul_mgpu(x, w, plan)
  twin = sm.reference(x, w, plan)
  want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
  scale = float(jnp.max(jnp.abs(want)))
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - twin.astype(jnp.float32)))) <= 1e-2 * scale
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) <= 1e-2 * scale


@pytest.mark.gpu
@gpu
def test_gpu_kernel_every_plan_shape():
  x, w = _xw(64, 2048, 512, jnp.bfloat16, seed=3)
  want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
  scale = float(jnp.max(jnp.abs(want)))
  for plan in [sm.GemmPlan(64, 1, 1, 2), sm.GemmPlan(128, 2, 4, 4), sm.GemmPlan(256, 2, 2, 3),
               sm.GemmPlan(128, 1, 8, 2)]:
    got = sm.skinny_matmul_mgpu(x, w, plan)
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
    assert err <= 1e-2 * scale, (plan, err)
