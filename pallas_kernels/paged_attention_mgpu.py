# Mosaic GPU (Hopper) paged decode attention: flash-decoding over transfer groups.
#
# Grid (B, Hkv, S), `streams` warpgroups per program. Warpgroup w of program (b, h, s) first reads
# its plan: either its sequence's length (a scalar load) and the split's slice of the block-table
# row (TMA into SMEM; the "table" plan: the kernel finds the contiguous chunks itself with
# partition.table_chunk_source, so a call is one kernel), or a prebuilt descriptor row (length,
# chunk sources, block ids) from partition.build_descriptors; and the block offset (e.g. the
# layer's first block in a pool of all layers) with another TMA. It then streams chunks w,
# w + streams, ... of split s through its own `stages`-deep ring of SMEM K/V buffers. A chunk
# whose valid blocks are physically consecutive (inside one transfer group) is one TMA of
# chunk_blocks*bs rows; any other chunk is chunk_blocks per-block TMAs. Both kinds are always
# issued, predicated on the chunk source, so every chunk arrives on its barrier exactly
# chunk_blocks + 1 times.
# The q heads of kv head h sit in a 64-row wgmma tile: one TMA of QP (G rounded up to 8) rows
# straight from the flat [B*Hq, D] q, so rows past G hold the next heads' q (or TMA's zero fill
# past the end) and give outputs nobody reads; no padded copy of q is made.
# S = Q K^T and O += P V run on the tensor cores, online softmax in registers. The warpgroups'
# partial results meet in SMEM and warpgroup 0 merges them (partition.merge_lse).
# Output: with S > 1, per split o normalised by its own sum (f32) and base-2 lse, merged by
# partition.combine_splits; with S == 1 the G final rows in q.dtype, straight into [B*Hq, D]
# (one kernel per call: no descriptor build, no combine, no convert).
from __future__ import annotations

import functools
import inspect
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.partition import (DESC_COLS, DESC_LENGTH, DESC_SRC, KVPartition,
                                      merge_lse, normalize_stream,
                                      table_chunk_source)

WG_ROWS = 64  # wgmma tile height: q rows of one kv head, zero padded
TABLE_PIECE = 256  # block ids per TMA of a block-table row (a TMA box is <= 256 per dim)
SMEM_ALIGN = 32    # int32 words: each TMA target of the plan starts on a 128-byte boundary


def table_plan_ok(max_blocks: int) -> bool:
  """Whether the kernel can read block tables itself: TMA needs rows of whole 16-byte units."""
  return max_blocks % 4 == 0


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _table_pieces(part: KVPartition) -> tuple[int, int]:
  """(ids per TMA, TMAs) covering one split's cps * chunk_blocks block ids; a box never exceeds
  the row (max_blocks), so the last split's boxes may run past it (TMA fills zeros: block 0)."""
  n = part.chunks_per_split * part.chunk_blocks
  piece = min(TABLE_PIECE, _round_up(n, 4), part.max_blocks)
  return piece, _round_up(n, piece) // piece


def _transpose(ref):
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))  # jax < 0.11


def _load(ref, layout):
  if _LOAD_NO_IDX:
    return plgpu.load(ref, layout=layout)
  return plgpu.load(ref, (), layout=layout)  # jax < 0.11


_LOAD_NO_IDX = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def _decode_kernel(*refs, table: bool, has_base: bool, causal_g: int = 0, **kw):
  n_plan = (3 if causal_g else 2) if table else 1
  plan_refs, rest = refs[:n_plan], refs[n_plan:]
  _decode_body(plan_refs, *(rest if has_base else (None, *rest)), table=table, causal_g=causal_g, **kw)


def _decode_body(plan_refs,  # table: (lengths [B], block_tables [B, MB][, starts [B]]) int32;
                             # else (desc [B, S, W/64, 64] int32,)
                 base_ref,   # [64] int32 (GMEM): word 0 is added to every block id; None: 0
                 q_ref,      # [B*Hq, D] (GMEM): row (b*Hkv + h)*G + g
                 k_ref,      # [Hkv, N*bs, D] (GMEM)
                 v_ref,      # [Hkv, N*bs, D] (GMEM)
                 o_ref,      # S > 1: [B, Hkv, S, QP, D] f32; S == 1: [B*Hq, D] q.dtype (GMEM)
                 lse_ref,    # [B, Hkv, S, QP] f32 (GMEM)
                 *, table: bool, part: KVPartition, qp: int, g: int, head_dim: int, dtype,
                 sm_scale: float, stages: int, causal_g: int = 0):
  # causal_g > 0 (query tiles; table plan, one split, one stream): the program's g rows are query
  # tokens of one sequence at positions start, start + 1, ..., causal_g rows (q heads) per token;
  # row r sees keys <= start + r // causal_g (and < length).
  b = lax.axis_index("b")
  h = lax.axis_index("h")
  s = lax.axis_index("s")
  ns = part.streams  # warpgroups; each runs its own ring and online softmax
  w = lax.axis_index("wg") if ns > 1 else jnp.int32(0)
  direct = part.num_splits == 1  # no split combine: write the final rows in q.dtype
  bs, cb, cps = part.block_size, part.chunk_blocks, part.chunks_per_split
  T, D = part.chunk_tokens, head_dim
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  scale_log2 = sm_scale * math.log2(math.e)
  q_row0 = (b * k_ref.shape[0] + h) * g
  # SMEM and barriers of a multi-warpgroup kernel are shared by its warpgroups.
  collective = dict(collective_axes="wg") if ns > 1 else {}

  piece, pieces = _table_pieces(part)

  def main(plan_smem,  # table: (ids [ns, pieces, piece rounded up to 32] int32,);
                       # else (desc [ns, W / 64, 64] int32,)
           base_smem,  # [ns, 64] int32
           q_smem,     # [ns, 64, D] tiled + swizzled (the wgmma operand)
           q_stage,    # [ns, 64, D] plain (untiled): TMA target at any row offset of q
           bars,       # [2 * ns] barriers: q, base of each stream
           plan_bars):  # [ns] barriers: the plan's copies of each stream
    my_bar = lambda i: bars.at[2 * w + i]
    # Named scopes are the regions of the on-device trace (PROFILE_ENV); without it they are free.
    with jax.named_scope("issue_plan"):
      if table:
        len_ref, bt_ref = plan_refs[:2]
        (bt_smem,) = plan_smem
        # One scalar load from GMEM per thread, in flight with the copies. (A TMA of 4 lengths
        # out of a longer [B] array raised an illegal instruction on the H100.)
        length = len_ref[b]
        start = plan_refs[2][b] if causal_g else None
        for p in range(pieces):
          plgpu.copy_gmem_to_smem(bt_ref.at[b, pl.ds(s * (cps * cb) + p * piece, piece)],
                                  bt_smem.at[w, p, pl.ds(0, piece)], plan_bars.at[w])
      else:
        plgpu.copy_gmem_to_smem(plan_refs[0].at[b, s], plan_smem[0].at[w], plan_bars.at[w])
    if base_ref is not None:  # one more small TMA (~0.5 us on the critical path of tiny calls)
      plgpu.copy_gmem_to_smem(base_ref, base_smem.at[w], my_bar(1))
    zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, D), dtype), plgpu.Layout.WGMMA)
    q_stage.at[w][...] = zeros
    plgpu.commit_smem()  # generic-proxy zeros before the TMA writes rows [0, QP)
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row0, qp)], q_stage.at[w, pl.ds(0, qp)], my_bar(0))
    with jax.named_scope("wait_plan"):
      plgpu.barrier_wait(plan_bars.at[w])
    if base_ref is not None:
      plgpu.barrier_wait(my_bar(1))

    base = jnp.int32(0) if base_ref is None else base_smem[w, 0]
    if table:
      blk = lambda k: bt_smem[w, k // piece, k % piece]  # the split's k-th block id
      nvalid = lax.div(length + (bs - 1), jnp.int32(bs)) - s * (cps * cb)
      limit = k_ref.shape[1] // bs - base
      chunk_src = lambda i: table_chunk_source(blk, i, cb, nvalid, limit)
    else:
      def rd(idx):  # word idx of the descriptor row
        return plan_smem[0][w, idx // DESC_COLS, idx % DESC_COLS]
      length = rd(DESC_LENGTH)
      blk = lambda k: rd(part.desc_blocks + k)
      chunk_src = lambda i: rd(DESC_SRC + i)

    total = lax.div(length + (T - 1), jnp.int32(T))
    first = s * cps
    n = jnp.clip(total - first, 0, cps)  # chunks of this split
    n_w = part.stream_chunks(n, w)       # of them, this stream's: w, w + ns, ...

    def kv_scope(k_smem,  # [ns * stages, T, D]
                 v_smem,  # [ns * stages, T, D]
                 k_bars,  # [ns * stages]
                 v_bars):  # [ns * stages]
      def issue(j, slot):  # the stream's j-th chunk into its ring slot
        i = w + j * ns   # chunk of the split
        buf = w * stages + slot
        src = chunk_src(i)
        contig = src >= 0
        row0 = (jnp.maximum(src, 0) + base) * bs
        plgpu.copy_gmem_to_smem(k_ref.at[h, pl.ds(row0, T)], k_smem.at[buf],
                                k_bars.at[buf], predicate=contig)
        plgpu.copy_gmem_to_smem(v_ref.at[h, pl.ds(row0, T)], v_smem.at[buf],
                                v_bars.at[buf], predicate=contig)
        frag = jnp.logical_not(contig)
        for jb in range(cb):
          rows = pl.ds((blk(i * cb + jb) + base) * bs, bs)
          plgpu.copy_gmem_to_smem(k_ref.at[h, rows], k_smem.at[buf, pl.ds(jb * bs, bs)],
                                  k_bars.at[buf], predicate=frag)
          plgpu.copy_gmem_to_smem(v_ref.at[h, rows], v_smem.at[buf, pl.ds(jb * bs, bs)],
                                  v_bars.at[buf], predicate=frag)

      with jax.named_scope("issue_kv"):
        for j in range(stages):
          @pl.when(j < n_w)
          def _prologue():
            issue(jnp.int32(j), j)

      with jax.named_scope("wait_q"):
        plgpu.barrier_wait(my_bar(0))
      # Into the tiled, swizzled wgmma operand. (q as a register operand gave wrong results on
      # the H100 whenever a program streamed several chunks of 64 tokens at d=64 or 128 at d=128.)
      with jax.named_scope("retile_q"):
        q_smem.at[w][...] = _load(q_stage.at[w], plgpu.Layout.WGMMA)
        plgpu.commit_smem()

      def softmax(qk, m_i, l_i, acc, rem_tok, rel0):  # online softmax of one chunk's raw scores
        def mask(qk):  # where, not a multiply: freed blocks may hold NaN
          cols = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, T), 1, layout=plgpu.Layout.WGMMA)
          qk = jnp.where(cols < rem_tok, qk, -jnp.inf)
          if causal_g:  # key <= start + r // g  <=>  (key - start) * g <= r  (integers)
            rows = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, T), 0, layout=plgpu.Layout.WGMMA)
            qk = jnp.where((cols + rel0) * causal_g <= rows, qk, -jnp.inf)
          return qk
        # Only a sequence's last chunk is partial (decode rows; query tiles: the chunks past the
        # tile's first position): the other chunks skip the compares and selects.
        partial = rel0 + (T - 1) > 0 if causal_g else rem_tok < T
        qk = lax.cond(partial, mask, lambda x: x, qk)
        # The scale is positive, so it commutes with the row max: scale the max once per row and
        # each score once inside the exponent (a multiply-add), not every score before the max.
        m_new = jnp.maximum(m_i, qk.max(axis=1) * scale_log2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(qk * scale_log2 - lax.broadcast_in_dim(m_new, qk.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return m_new, l_i, acc, p.astype(dtype)

      def body(j, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(j, jnp.int32(stages))
        buf = w * stages + slot
        chunk0 = (first + w + j * ns) * T  # the chunk's first key
        rem_tok = length - chunk0  # valid tokens of this chunk (may exceed T)
        rel0 = chunk0 - start if causal_g else None
        with jax.named_scope("wait_k"):
          plgpu.barrier_wait(k_bars.at[buf])

        def qk_scope(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[w], _transpose(k_smem.at[buf]))
          return acc_ref[...]
        with jax.named_scope("qk"):
          qk = pl.run_scoped(qk_scope, plgpu.ACC((WG_ROWS, T), jnp.float32))
        with jax.named_scope("softmax"):
          m_new, l_i, acc, p16 = softmax(qk, m_i, l_i, acc, rem_tok, rel0)
        with jax.named_scope("wait_v"):
          plgpu.barrier_wait(v_bars.at[buf])

        @pl.when(rem_tok < T)
        def _sanitize_tail():
          # P is 0 there, but 0 * NaN = NaN in P V: zero V rows past the length.
          v = _load(v_smem.at[buf], plgpu.Layout.WGMMA)
          rows = plgpu.broadcasted_iota(jnp.int32, (T, D), 0, layout=plgpu.Layout.WGMMA)
          v_smem.at[buf][...] = jnp.where(rows < rem_tok, v, jnp.zeros_like(v))
          plgpu.commit_smem()

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[buf])
        with jax.named_scope("pv"):
          acc = pl.run_state(pv)(plgpu.ACC.init(acc))

        @pl.when(j + stages < n_w)
        def _refill():  # the slot just read takes the stream's chunk j + stages
          issue(j + stages, slot)
        return acc, m_new, l_i

      acc0 = plgpu.layout_cast(jnp.zeros((WG_ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
      m0 = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(1))
      l0 = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      return lax.fori_loop(0, n_w, body, (acc0, m0, l0))

    acc, m_i, l_i = pl.run_scoped(
        kv_scope,
        plgpu.SMEM((ns * stages, T, D), dtype, transforms=(tiling, swizzle)),
        plgpu.SMEM((ns * stages, T, D), dtype, transforms=(tiling, swizzle)),
        plgpu.Barrier(num_arrivals=cb + 1, num_barriers=ns * stages),
        plgpu.Barrier(num_arrivals=cb + 1, num_barriers=ns * stages),
        **collective,
    )
    with jax.named_scope("normalize"):
      o, lse = normalize_stream(acc, m_i, l_i)

    @jax.named_scope("write")
    def write(o, lse, o_smem, lse_smem):
      o_smem[...] = o.astype(o_smem.dtype)
      lse_smem[...] = lse
      plgpu.commit_smem()
      if direct:  # the G rows of this kv head, straight into the [B*Hq, D] output
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, g)], o_ref.at[pl.ds(q_row0, g)])
      else:
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, qp)], o_ref.at[b, h, s])
      plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, qp)], lse_ref.at[b, h, s])
      plgpu.wait_smem_to_gmem(0)

    def out_scope(o_smem,      # [64, D]: f32 partial (S > 1) or q.dtype rows (S == 1)
                  lse_smem,    # [64] f32
                  *merge):     # ns > 1: o [ns - 1, 64, D] f32, lse [ns - 1, 64] f32, barrier
      if ns == 1:
        write(o, lse, o_smem, lse_smem)
        return
      merge_o, merge_l, merge_bar = merge

      # Entering this scope synchronised the warpgroups, so every ring is idle and these
      # buffers may reuse its memory. Streams 1.. hand their partials to stream 0 through
      # SMEM; stream 0 merges them and writes.
      @pl.when(w > 0)
      def _hand_over():
        merge_o.at[w - 1][...] = o
        merge_l.at[w - 1][...] = lse
        plgpu.barrier_arrive(merge_bar)

      @pl.when(w == 0)
      def _merge_and_write():
        plgpu.barrier_wait(merge_bar)
        os_, lses = [o], [lse]
        for i in range(ns - 1):
          os_.append(_load(merge_o.at[i], plgpu.Layout.WGMMA))
          lses.append(_load(merge_l.at[i], plgpu.Layout.WGMMA.reduce(1)))
        write(*merge_lse(os_, lses), o_smem, lse_smem)

    merge = ()
    if ns > 1:
      merge = (plgpu.SMEM((ns - 1, WG_ROWS, D), jnp.float32),
               plgpu.SMEM((ns - 1, WG_ROWS), jnp.float32),
               plgpu.Barrier(num_arrivals=ns - 1))
    pl.run_scoped(out_scope, plgpu.SMEM((WG_ROWS, D), dtype if direct else jnp.float32),
                  plgpu.SMEM((WG_ROWS,), jnp.float32), *merge, **collective)

  if table:
    plan_smem = (plgpu.SMEM((ns, pieces, _round_up(piece, SMEM_ALIGN)), jnp.int32),)
  else:
    plan_smem = (plgpu.SMEM((ns, part.desc_width // DESC_COLS, DESC_COLS), jnp.int32),)
  pl.run_scoped(
      main,
      plan_smem,
      plgpu.SMEM((ns, DESC_COLS), jnp.int32),
      plgpu.SMEM((ns, WG_ROWS, D), dtype, transforms=(tiling, swizzle)),
      plgpu.SMEM((ns, WG_ROWS, D), dtype),
      plgpu.Barrier(num_arrivals=1, num_barriers=2 * ns),
      plgpu.Barrier(num_arrivals=pieces if table else 1, num_barriers=ns),
      **collective,
  )


def decode_partials_mgpu(plan,   # (lengths [B], block_tables [B, MB]) int32 (table_plan_ok), or
                                 # desc [B, S, W] int32 (build_descriptors)
                         base,   # [64] int32: word 0 is added to every block id (None: 0)
                         q,      # [B, Hq, D]
                         k_flat,  # [Hkv, N*bs, D]
                         v_flat,  # [Hkv, N*bs, D]
                         *, part: KVPartition, sm_scale: float, stages: int = 2, causal_g: int = 0):
  """Runs the Mosaic GPU kernel; returns (o, lse [B, Hkv, S, QP] f32 base 2), QP = q heads per kv
  head rounded up to 8 (rows past that count are not meaningful).

  S > 1: o [B, Hkv, S, QP, D] f32, each split normalised by its own sum (merge with
  partition.combine_splits). S == 1: o [B, Hq, D] in q.dtype, final.
  causal_g > 0: query tiles (paged_attention.paged_tile_attention): plan (lengths, block_tables,
  starts), q [B, Hkv * 64, D] holds 64 / causal_g consecutive query tokens per (tile, kv head),
  causal_g q heads each; one split, one stream.
  """
  if causal_g and (not isinstance(plan, tuple) or len(plan) != 3 or part.num_splits != 1 or part.streams != 1):
    raise ValueError("query tiles take the table plan with starts, one split and one stream")
  B, Hq, D = q.shape
  Hkv = k_flat.shape[0]
  g = Hq // Hkv
  qp = _round_up(g, 8)
  S, ns = part.num_splits, part.streams
  rows = q.reshape(B * Hq, D)
  if B * Hq < qp:  # the one TMA box must fit inside the array
    rows = jnp.pad(rows, ((0, qp - B * Hq), (0, 0)))
  table = isinstance(plan, tuple)
  kernel = functools.partial(_decode_kernel, table=table, has_base=base is not None, part=part,
                             qp=qp, g=g, head_dim=D, dtype=q.dtype, sm_scale=sm_scale,
                             stages=stages, causal_g=causal_g)
  o_type = (jax.ShapeDtypeStruct((B * Hq, D), q.dtype) if S == 1
            else jax.ShapeDtypeStruct((B, Hkv, S, qp, D), jnp.float32))
  threads = dict(num_threads=ns, thread_name="wg") if ns > 1 else {}
  call = plgpu.kernel(
      kernel,
      out_type=(o_type, jax.ShapeDtypeStruct((B, Hkv, S, qp), jnp.float32)),
      grid=(B, Hkv, S),
      grid_names=("b", "h", "s"),
      compiler_params=plgpu.CompilerParams(approx_math=True, **_profile_params()),
      kernel_name=f"paged_{'tile' if causal_g else 'decode'}_mgpu_c{part.chunk_tokens}_st{stages}_w{ns}"
                  + ("_table" if table else ""),
      **threads,
  )
  if not table:
    plan = (plan.reshape(B, S, part.desc_width // DESC_COLS, DESC_COLS),)
  o, lse = call(*plan, *(() if base is None else (base,)), rows, k_flat, v_flat)
  return (o.reshape(B, Hq, D) if S == 1 else o), lse


PROFILE_ENV = "KVRM_MOSAIC_PROFILE_DIR"


def _profile_params() -> dict:
  """With $KVRM_MOSAIC_PROFILE_DIR set, every call writes Mosaic GPU's on-device trace (per
  program and warpgroup: the plan, K and V waits, the write) as Perfetto JSON into that folder;
  open it in Perfetto (ui.perfetto.dev). A developer hook: it slows the kernel a little."""
  path = os.environ.get(PROFILE_ENV)
  if not path:
    return {}
  return dict(profile_space=512, profile_dir=path, profile_bounds_check=True)


MAX_SMEM_BYTES = 232448  # H100 / H200: what Mosaic GPU reports as available per block


def smem_bytes(part: KVPartition, head_dim: int, stages: int, itemsize: int = 2) -> int:
  """Estimated shared memory of the decode kernel, in bytes. On six tiles lowered for CUDA it came
  out 0.9-1.9 KB above Mosaic's own count; the 4 KB term covers barriers and alignment. Counts
  the descriptor plan; the table plan's lengths and block ids take no more than its row."""
  ns, D = part.streams, head_dim
  main = ns * (part.desc_width * 4 + DESC_COLS * 4 + 2 * WG_ROWS * D * itemsize)
  ring = 2 * ns * stages * part.chunk_tokens * D * itemsize
  out = WG_ROWS * D * 4 + WG_ROWS * 4 + (ns - 1) * (WG_ROWS * D * 4 + WG_ROWS * 4)
  return main + max(ring, out) + 4096


def check_smem(part: KVPartition, head_dim: int, stages: int, itemsize: int = 2) -> None:
  """ValueError (with what to change) for a tile that cannot fit shared memory; the estimate's
  slack is given back so that no tile Mosaic would accept is refused here."""
  need = smem_bytes(part, head_dim, stages, itemsize) - 4096
  if need > MAX_SMEM_BYTES:
    fixes = ["fewer stages", "fewer streams"] + (["64-token chunks"] if part.chunk_tokens > 64 else [])
    raise ValueError(
        f"this tile needs about {need // 1024} KiB of shared memory, over the "
        f"{MAX_SMEM_BYTES // 1024} KiB a block may use: chunk_tokens={part.chunk_tokens} x "
        f"stages={stages} x streams={part.streams} at head_dim={head_dim}; use "
        f"{', '.join(fixes[:-1])} or {fixes[-1]} (or leave the tile to the default)")


def available() -> bool:
  """Whether this jax has what the kernels use: predicated TMA copies arrived in jax 0.11."""
  return "predicate" in inspect.signature(plgpu.copy_gmem_to_smem).parameters


def mgpu_supported(q_dtype, head_dim: int, q_per_kv: int, block_size: int) -> bool:
  if not available():
    return False
  return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 64 == 0 and q_per_kv <= WG_ROWS and block_size % 8 == 0)
