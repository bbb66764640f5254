# Batched block copy for compaction and copy-on-write.
#
# moves: [M, 2] int32 (src, dst) rows, padded with (0, 0) which is a no-op.
# The pager guarantees all reads happen before writes: dsts are distinct and no
# dst is a src, so programs of the Mosaic kernel never race.
# Mosaic GPU kernel: grid (M, L, Hkv / hc); program (m, l, j) bounces
# k/v[l, heads j*hc:(j+1)*hc, src] through SMEM into [.., dst] with TMA. The pools
# are aliased input -> output, so with a donating caller the update is in place.
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SMEM_BUDGET = 96 * 1024  # bytes for one program's K + V staging


def _check(k_pool, v_pool, moves):
  if k_pool.ndim != 5 or k_pool.shape != v_pool.shape:
    raise ValueError(f"pools must both be [L, Hkv, N, bs, D], got {k_pool.shape}, "
                     f"{v_pool.shape}")
  if k_pool.dtype != v_pool.dtype:
    raise ValueError(f"pool dtypes differ: {k_pool.dtype} vs {v_pool.dtype}")
  if moves.ndim != 2 or moves.shape[1] != 2 or moves.dtype != jnp.int32:
    raise ValueError(f"moves must be int32 [M, 2], got {moves.dtype} {moves.shape}")


@jax.jit
def copy_blocks_reference(k_pool,  # [L, Hkv, N, bs, D]
                          v_pool,  # [L, Hkv, N, bs, D]
                          moves):  # [M, 2] int32 (src, dst)
  """Copies pool blocks src -> dst in every layer and head (pure jnp)."""
  _check(k_pool, v_pool, moves)
  src, dst = moves[:, 0], moves[:, 1]
  k_pool = k_pool.at[:, :, dst].set(k_pool[:, :, src])
  v_pool = v_pool.at[:, :, dst].set(v_pool[:, :, src])
  return k_pool, v_pool


def _copy_kernel(moves_ref,  # [M, 2] int32 (GMEM)
                 k_ref,      # [L, Hkv, N, bs, D] (GMEM, updated in place)
                 v_ref,      # [L, Hkv, N, bs, D] (GMEM, updated in place)
                 buf,        # [2, hc, bs, D] SMEM
                 bars,       # [2] barriers
                 *, hc: int):
  m, l, j = lax.axis_index("m"), lax.axis_index("l"), lax.axis_index("j")
  src = moves_ref[m, 0]
  dst = moves_ref[m, 1]
  heads = pl.ds(j * hc, hc)

  @pl.when(src != dst)
  def _copy():
    plgpu.copy_gmem_to_smem(k_ref.at[l, heads, src], buf.at[0], bars.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[l, heads, src], buf.at[1], bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    plgpu.copy_smem_to_gmem(buf.at[0], k_ref.at[l, heads, dst])
    plgpu.barrier_wait(bars.at[1])
    plgpu.copy_smem_to_gmem(buf.at[1], v_ref.at[l, heads, dst])
    plgpu.wait_smem_to_gmem(0)


def _copy_mosaic(k_pool, v_pool, moves):
  L, Hkv, N, bs, D = k_pool.shape
  M = moves.shape[0]
  per_head = bs * D * k_pool.dtype.itemsize
  hc = max(d for d in range(1, Hkv + 1) if Hkv % d == 0 and 2 * d * per_head <= SMEM_BUDGET)
  call = plgpu.kernel(
      functools.partial(_copy_kernel, hc=hc),
      out_type=(),
      scratch_types=[plgpu.SMEM((2, hc, bs, D), k_pool.dtype),
                     plgpu.Barrier(num_arrivals=1, num_barriers=2)],
      grid=(M, L, Hkv // hc),
      grid_names=("m", "l", "j"),
      kernel_name=f"copy_blocks_h{hc}",
  )

  def on_refs(refs):  # writes into the pool refs: discharged as input/output aliases
    call(moves, *refs)
  return pl.run_state(on_refs)((k_pool, v_pool))


@functools.partial(jax.jit, static_argnames=("backend", "interpret"), donate_argnums=(0, 1))
def copy_blocks(k_pool,  # [L, Hkv, N, bs, D]
                v_pool,  # [L, Hkv, N, bs, D]
                moves,   # [M, 2] int32 (src, dst), (0, 0) = no-op
                *, backend="auto", interpret=False):
  """Copies blocks src -> dst across all layers and kv heads; returns the new pools.

  The pools are donated. backend: "reference" (`.at[].set`), "mosaic" (TMA
  bounce through SMEM, pools aliased in place), "auto" (mosaic on a Hopper
  GPU, else reference). interpret=True runs the reference (Mosaic GPU's
  interpret mode cannot run TMA copies in jax 0.10).
  """
  _check(k_pool, v_pool, moves)
  if backend not in ("auto", "reference", "mosaic"):
    raise ValueError(f"backend must be auto, reference or mosaic, got {backend!r}")
  if backend == "auto":
    on_hopper = jax.default_backend() == "gpu" and any(
        t in jax.devices()[0].device_kind.lower() for t in ("h100", "h200", "h800"))
    backend = "mosaic" if on_hopper else "reference"
  if interpret or backend == "reference":
    return copy_blocks_reference(k_pool, v_pool, moves)
  return tuple(_copy_mosaic(k_pool, v_pool, moves))
