# Mosaic GPU (Hopper) paged decode attention: flash-decoding over transfer groups.
#
# Grid (B, Hkv, S). Program (b, h, s) copies its descriptor row (length, chunk
# sources, block ids) into SMEM with one TMA (and the block offset, e.g. the
# layer's first block in a pool of all layers, with another), then streams its chunks through a
# `stages`-deep ring of SMEM K/V buffers. A chunk inside one transfer group is
# one TMA of chunk_blocks*bs rows; any other chunk is chunk_blocks per-block
# TMAs. Both kinds are always issued, predicated on the chunk source, so every
# chunk arrives on its barrier exactly chunk_blocks + 1 times.
# The q heads of kv head h sit in a 64-row wgmma tile: one TMA of QP (G rounded
# up to 8) rows straight from the flat [B*Hq, D] q, so rows past G hold the next
# heads' q (or TMA's zero fill past the end) and give outputs nobody reads;
# no padded copy of q is made.
# S = Q K^T and O += P V run on the tensor cores, online softmax in registers.
# Output per program: o normalised by its own sum (f32) and base-2 lse;
# partition.combine_splits merges the splits.
from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.partition import DESC_COLS, DESC_LENGTH, DESC_SRC, KVPartition

WG_ROWS = 64  # wgmma tile height: q rows of one kv head, zero padded


def _transpose(ref):
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # jax < 0.11


def _load(ref, layout):
  if _LOAD_NO_IDX:
    return plgpu.load(ref, layout=layout)
  return plgpu.load(ref, (), layout=layout)  # jax < 0.11


_LOAD_NO_IDX = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def _decode_kernel(desc_ref,   # [B, S, W / 64, 64] int32 (GMEM)
                   *refs, has_base: bool, **kw):
  if has_base:
    _decode_body(desc_ref, *refs, **kw)
  else:
    _decode_body(desc_ref, None, *refs, **kw)


def _decode_body(desc_ref,   # [B, S, W / 64, 64] int32 (GMEM)
                 base_ref,   # [64] int32 (GMEM): word 0 is added to every block id; None: 0
                 q_ref,      # [B*Hq, D] (GMEM): row (b*Hkv + h)*G + g
                 k_ref,      # [Hkv, N*bs, D] (GMEM)
                 v_ref,      # [Hkv, N*bs, D] (GMEM)
                 o_ref,      # [B, Hkv, S, QP, D] f32 (GMEM)
                 lse_ref,    # [B, Hkv, S, QP] f32 (GMEM)
                 *, part: KVPartition, qp: int, g: int, head_dim: int, dtype, sm_scale: float,
                 stages: int):
  b = lax.axis_index("b")
  h = lax.axis_index("h")
  s = lax.axis_index("s")
  bs, cb, cps = part.block_size, part.chunk_blocks, part.chunks_per_split
  T, D = part.chunk_tokens, head_dim
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scale_log2 = sm_scale * math.log2(math.e)

  def main(desc_smem,  # [W / 64, 64] int32
           base_smem,  # [64] int32
           q_smem,     # [64, D] tiled + swizzled (the wgmma operand)
           q_stage,    # [64, D] plain (untiled): TMA target at any row offset of q
           bars):      # [3] barriers: desc, q, base
    plgpu.copy_gmem_to_smem(desc_ref.at[b, s], desc_smem, bars.at[0])
    if base_ref is not None:  # one more small TMA (~0.5 us on the critical path of tiny calls)
      plgpu.copy_gmem_to_smem(base_ref, base_smem, bars.at[2])
    zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, D), dtype), plgpu.Layout.WGMMA)
    q_stage[...] = zeros
    plgpu.commit_smem()  # generic-proxy zeros before the TMA writes rows [0, QP)
    q_row0 = (b * k_ref.shape[0] + h) * g
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row0, qp)], q_stage.at[pl.ds(0, qp)], bars.at[1])
    plgpu.barrier_wait(bars.at[0])
    if base_ref is not None:
      plgpu.barrier_wait(bars.at[2])

    def rd(idx):  # word idx of the descriptor row
      return desc_smem[idx // DESC_COLS, idx % DESC_COLS]

    base = jnp.int32(0) if base_ref is None else base_smem[0]

    length = rd(DESC_LENGTH)
    total = lax.div(length + (T - 1), jnp.int32(T))
    first = s * cps
    n = jnp.clip(total - first, 0, cps)

    def kv_scope(k_smem,  # [stages, T, D]
                 v_smem,  # [stages, T, D]
                 k_bars,  # [stages]
                 v_bars):  # [stages]
      def issue(i, slot):
        src = rd(DESC_SRC + i)
        contig = src >= 0
        row0 = (jnp.maximum(src, 0) + base) * bs
        plgpu.copy_gmem_to_smem(k_ref.at[h, pl.ds(row0, T)], k_smem.at[slot],
                                k_bars.at[slot], predicate=contig)
        plgpu.copy_gmem_to_smem(v_ref.at[h, pl.ds(row0, T)], v_smem.at[slot],
                                v_bars.at[slot], predicate=contig)
        frag = jnp.logical_not(contig)
        for j in range(cb):
          blk = rd(part.desc_blocks + i * cb + j) + base
          rows = pl.ds(blk * bs, bs)
          plgpu.copy_gmem_to_smem(k_ref.at[h, rows], k_smem.at[slot, pl.ds(j * bs, bs)],
                                  k_bars.at[slot], predicate=frag)
          plgpu.copy_gmem_to_smem(v_ref.at[h, rows], v_smem.at[slot, pl.ds(j * bs, bs)],
                                  v_bars.at[slot], predicate=frag)

      for i in range(stages):
        @pl.when(i < n)
        def _prologue():
          issue(jnp.int32(i), i)

      plgpu.barrier_wait(bars.at[1])
      q_smem[...] = _load(q_stage, plgpu.Layout.WGMMA)  # into the tiled, swizzled wgmma operand
      plgpu.commit_smem()

      def body(i, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(i, jnp.int32(stages))
        rem_tok = length - (first + i) * T  # valid tokens of this chunk (may exceed T)
        plgpu.barrier_wait(k_bars.at[slot])

        def qk_scope(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, _transpose(k_smem.at[slot]))
          return acc_ref[...]
        qk = pl.run_scoped(qk_scope, plgpu.ACC((WG_ROWS, T), jnp.float32))
        cols = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, T), 1, layout=plgpu.Layout.WGMMA)
        # where, not a multiply: freed blocks may hold NaN.
        qk = jnp.where(cols < rem_tok, qk * scale_log2, -jnp.inf)
        m_new = jnp.maximum(m_i, qk.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(qk - lax.broadcast_in_dim(m_new, qk.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(dtype)
        plgpu.barrier_wait(v_bars.at[slot])

        @pl.when(rem_tok < T)
        def _sanitize_tail():
          # P is 0 there, but 0 * NaN = NaN in P V: zero V rows past the length.
          v = _load(v_smem.at[slot], plgpu.Layout.WGMMA)
          rows = plgpu.broadcasted_iota(jnp.int32, (T, D), 0, layout=plgpu.Layout.WGMMA)
          v_smem.at[slot][...] = jnp.where(rows < rem_tok, v, jnp.zeros_like(v))
          plgpu.commit_smem()

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))

        @pl.when(i + stages < n)
        def _refill():
          issue(i + stages, slot)
        return acc, m_new, l_i

      acc0 = plgpu.layout_cast(jnp.zeros((WG_ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
      m0 = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(1))
      l0 = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      return lax.fori_loop(0, n, body, (acc0, m0, l0))

    acc, m_i, l_i = pl.run_scoped(
        kv_scope,
        plgpu.SMEM((stages, T, D), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((stages, T, D), dtype, transforms=(tiling, swizzle)),
        plgpu.Barrier(num_arrivals=cb + 1, num_barriers=stages),
        plgpu.Barrier(num_arrivals=cb + 1, num_barriers=stages),
    )

    def out_scope(o_smem,    # [64, D] f32
                  lse_smem):  # [64] f32
      has = l_i > 0  # False only for an empty split
      l_safe = jnp.where(has, l_i, jnp.ones_like(l_i))
      o_smem[...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
      lse_smem[...] = jnp.where(has, m_i + jnp.log(l_safe) * (1 / math.log(2)),
                                jnp.full_like(m_i, -jnp.inf))
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, qp)], o_ref.at[b, h, s])
      plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, qp)], lse_ref.at[b, h, s])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(out_scope, plgpu.SMEM((WG_ROWS, D), jnp.float32),
                  plgpu.SMEM((WG_ROWS,), jnp.float32))

  pl.run_scoped(
      main,
      plgpu.SMEM((part.desc_width // DESC_COLS, DESC_COLS), jnp.int32),
      plgpu.SMEM((DESC_COLS,), jnp.int32),
      plgpu.SMEM((WG_ROWS, D), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((WG_ROWS, D), dtype),
      plgpu.Barrier(num_arrivals=1, num_barriers=3),
  )


def decode_partials_mgpu(desc,   # [B, S, W] int32 (viewed as [B, S, W / 64, 64])
                         base,   # [64] int32: word 0 is added to every block id (None: 0)
                         q,      # [B, Hq, D]
                         k_flat,  # [Hkv, N*bs, D]
                         v_flat,  # [Hkv, N*bs, D]
                         *, part: KVPartition, sm_scale: float, stages: int = 2):
  """Runs the Mosaic GPU kernel; returns (o [B, Hkv, S, QP, D] f32, lse [B, Hkv, S, QP] f32),
  QP = q heads per kv head rounded up to 8 (rows past that count are not meaningful)."""
  B, Hq, D = q.shape
  Hkv = k_flat.shape[0]
  g = Hq // Hkv
  qp = -(-g // 8) * 8
  S = part.num_splits
  rows = q.reshape(B * Hq, D)
  if B * Hq < qp:  # the one TMA box must fit inside the array
    rows = jnp.pad(rows, ((0, qp - B * Hq), (0, 0)))
  kernel = functools.partial(_decode_kernel, has_base=base is not None, part=part, qp=qp, g=g, head_dim=D,
                             dtype=q.dtype, sm_scale=sm_scale, stages=stages)
  call = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((B, Hkv, S, qp, D), jnp.float32),
                jax.ShapeDtypeStruct((B, Hkv, S, qp), jnp.float32)),
      grid=(B, Hkv, S),
      grid_names=("b", "h", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      kernel_name=f"paged_decode_mgpu_c{part.chunk_tokens}_st{stages}",
  )
  desc = desc.reshape(B, S, part.desc_width // DESC_COLS, DESC_COLS)
  if base is None:
    return call(desc, rows, k_flat, v_flat)
  return call(desc, base, rows, k_flat, v_flat)


def mgpu_supported(q_dtype, head_dim: int, q_per_kv: int, block_size: int) -> bool:
  # Predicated TMA copies (copy_gmem_to_smem(predicate=...)) arrived in jax 0.11.
  if "predicate" not in inspect.signature(plgpu.copy_gmem_to_smem).parameters:
    return False
  return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 64 == 0 and q_per_kv <= WG_ROWS and block_size % 8 == 0)
