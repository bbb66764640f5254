# Paged decode attention over a block pool, flash-decoding over transfer groups.
#
# Three layers (STYLE.md 7): kernel on refs -> pallas_call builder -> public jit
# wrapper. The generic kernel below runs under interpret mode on CPU and through
# the (deprecated) Triton backend on GPU; the Mosaic GPU kernel lives in
# paged_attention_mgpu.py. Both take the same descriptors and split arithmetic
# from partition.py (chunks -> splits, and each split's chunks dealt to `streams`
# online-softmax streams merged inside the program), and both return per-split
# (o, lse) merged by partition.combine_splits; with one split the Mosaic kernel
# writes the final rows itself.
#
# Einsum legend: B batch, K kv heads, G q heads per kv head, T tokens, D head dim.
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import paged_attention_mgpu as mgpu
from pallas_kernels.partition import (DESC_COLS, DESC_LENGTH, DESC_SRC, KVPartition,
                                      build_descriptors, combine_splits, merge_lse,
                                      normalize_stream)

BACKENDS = ("auto", "reference", "interpret", "mosaic", "triton")
MAX_STREAMS = 4  # Mosaic warpgroups per program
LOG2E = math.log2(math.e)


def _generic_kernel(*refs, causal_g: int = 0, **kw):
  if causal_g:  # query tiles: the first ref holds the tile's first position
    start_ref, refs = refs[0], refs[1:]
    _generic_body(*refs, start=start_ref[0], causal_g=causal_g, **kw)
  else:
    _generic_body(*refs, start=None, causal_g=0, **kw)


def _generic_body(desc_ref,  # [W] int32: length, chunk sources, block ids of this split
                  base_ref,  # [DESC_COLS] int32: block offset added to every block id (word 0)
                  q_ref,     # [QP, D]
                  k_ref,     # [N, bs, D]
                  v_ref,     # [N, bs, D]
                  o_ref,     # [QP, D] f32
                  lse_ref,   # [QP] f32
                  *, part: KVPartition, sm_scale: float, gather_only: bool, start, causal_g: int):
  # causal_g > 0: the QP rows are query tokens of one sequence at positions start, start + 1, ...,
  # causal_g rows (q heads) per token; row r sees keys <= start + r // causal_g (and < length).
  cb, cps, T = part.chunk_blocks, part.chunks_per_split, part.chunk_tokens
  QP, D = q_ref.shape
  split = pl.program_id(2)
  length = desc_ref[DESC_LENGTH]
  first = split * cps
  n = jnp.clip(lax.div(length + (T - 1), T) - first, 0, cps)
  q = q_ref[...]
  scale_log2 = sm_scale * LOG2E
  base = base_ref[0]
  ns = part.streams

  def body(w, j, carry):  # chunk i = w + j * ns of the split, in stream w (as the Mosaic kernel)
    acc, m_i, l_i = carry
    i = w + j * ns
    raw = desc_ref[DESC_SRC + i]
    src = jnp.where(raw >= 0, raw + base, raw)
    blocks = desc_ref[pl.ds(part.desc_blocks + i * cb, cb)] + base  # [cb]

    if gather_only:
      # Triton: one gather; a contiguous chunk is a gather of consecutive ids.
      ids = jnp.where(src >= 0, src + lax.broadcasted_iota(jnp.int32, (cb,), 0), blocks)
      k, v = k_ref[ids].reshape(T, D), v_ref[ids].reshape(T, D)
    else:
      def contiguous():  # one run of cb physically adjacent blocks
        start = jnp.maximum(src, 0)
        return (k_ref[pl.ds(start, cb)].reshape(T, D), v_ref[pl.ds(start, cb)].reshape(T, D))

      def per_block():
        return k_ref[blocks].reshape(T, D), v_ref[blocks].reshape(T, D)

      k, v = lax.cond(src >= 0, contiguous, per_block)
    tok = (first + i) * T + lax.broadcasted_iota(jnp.int32, (T,), 0)
    valid = tok < length
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # [QP, T]
    ok = valid[None, :]
    if causal_g:  # key <= start + r // g  <=>  (key - start) * g <= r  (integers)
      rows = lax.broadcasted_iota(jnp.int32, (QP, T), 0)
      ok = ok & ((tok[None, :] - start) * causal_g <= rows)
    # where, not a multiply: freed blocks may hold NaN.
    s = jnp.where(ok, s * scale_log2, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=-1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_i = l_i * alpha + p.sum(axis=-1)
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l_i

  outs, lses = [], []
  for w in range(ns):
    acc = jnp.zeros((QP, D), jnp.float32)
    m_i = jnp.full((QP,), -jnp.inf, jnp.float32)
    l_i = jnp.zeros((QP,), jnp.float32)
    acc, m_i, l_i = lax.fori_loop(0, part.stream_chunks(n, w), functools.partial(body, w),
                                  (acc, m_i, l_i))
    o, lse = normalize_stream(acc, m_i, l_i)
    outs.append(o)
    lses.append(lse)
  o, lse = merge_lse(outs, lses) if ns > 1 else (outs[0], lses[0])
  o_ref[...] = o
  lse_ref[...] = lse


def _generic_call(desc,   # [B, S, W] int32
                  base,   # [DESC_COLS] int32: block offset (word 0)
                  q4,     # [B, Hkv, QP, D]
                  k_pool,  # [Hkv, N, bs, D]
                  v_pool,  # [Hkv, N, bs, D]
                  *, part: KVPartition, sm_scale: float, interpret: bool,
                  num_warps: int = 4, num_stages: int = 2, gather_only: bool | None = None,
                  starts=None, causal_g: int = 0):
  # starts [B] int32 with causal_g > 0: query tiles (see _generic_body), one split, one stream.
  B, Hkv, QP, D = q4.shape
  _, N, bs, _ = k_pool.shape
  S, W = part.num_splits, part.desc_width
  kernel = functools.partial(_generic_kernel, part=part, sm_scale=sm_scale, causal_g=causal_g,
                             gather_only=(not interpret) if gather_only is None else gather_only)
  params = {}
  if not interpret:
    params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                        num_stages=num_stages)
  first = ()
  if causal_g:
    first = (pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),)
  return pl.pallas_call(
      kernel,
      grid=(B, Hkv, S),
      in_specs=[*first,
          pl.BlockSpec((None, None, W), lambda b, h, s: (b, s, 0)),
          pl.BlockSpec((DESC_COLS,), lambda b, h, s: (0,)),
          pl.BlockSpec((None, None, QP, D), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, N, bs, D), lambda b, h, s: (h, 0, 0, 0)),
          pl.BlockSpec((None, N, bs, D), lambda b, h, s: (h, 0, 0, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, QP, D), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, QP), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((B, Hkv, S, QP, D), jnp.float32),
                 jax.ShapeDtypeStruct((B, Hkv, S, QP), jnp.float32)],
      interpret=interpret,
      name=f"paged_{'tile' if causal_g else 'decode'}_generic_c{part.chunk_tokens}_s{S}",
      **params,
  )(*(() if not causal_g else (starts.reshape(B, 1),)), desc, base, q4, k_pool, v_pool)


def _resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  if jax.default_backend() == "gpu":
    kind = jax.devices()[0].device_kind.lower()
    if "h100" in kind or "h200" in kind or "h800" in kind or "gh200" in kind:
      return "mosaic"
    return "triton"
  return "reference"


def _check_args(q, k_pool, v_pool, lengths, block_tables, groups, num_groups):
  if q.ndim != 3:
    raise ValueError(f"q must be [B, Hq, D], got shape {q.shape}")
  if k_pool.ndim != 4 or v_pool.ndim != 4:
    raise ValueError(f"pools must be [Hkv, N, bs, D], got {k_pool.shape}, {v_pool.shape}")
  if k_pool.shape != v_pool.shape:
    raise ValueError(f"k_pool {k_pool.shape} and v_pool {v_pool.shape} differ")
  B, Hq, D = q.shape
  Hkv, _, _, Dk = k_pool.shape
  if Dk != D:
    raise ValueError(f"head dim of q ({D}) and pools ({Dk}) differ")
  if Hq % Hkv:
    raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({Hkv})")
  if not (q.dtype == k_pool.dtype == v_pool.dtype):
    raise ValueError(f"dtypes differ: q {q.dtype}, k {k_pool.dtype}, v {v_pool.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q must be floating point, got {q.dtype}")
  if lengths.shape != (B,) or lengths.dtype != jnp.int32:
    raise ValueError(f"lengths must be int32 [B={B}], got {lengths.dtype} {lengths.shape}")
  if block_tables.ndim != 2 or block_tables.shape[0] != B or block_tables.dtype != jnp.int32:
    raise ValueError(f"block_tables must be int32 [B, MB], got {block_tables.dtype} "
                     f"{block_tables.shape}")
  if groups is not None:
    if groups.ndim != 3 or groups.shape[0] != B or groups.shape[2] != 3:
      raise ValueError(f"groups must be int32 [B, G, 3], got {groups.shape}")
    if num_groups is None or num_groups.shape != (B,):
      raise ValueError("num_groups must be int32 [B] when groups are given")


@functools.partial(jax.jit, static_argnames=("sm_scale", "return_lse"))
def paged_decode_attention_reference(q,             # [B, Hq, D]
                                     k_pool,        # [Hkv, N, bs, D]
                                     v_pool,        # [Hkv, N, bs, D]
                                     lengths,       # [B] int32
                                     block_tables,  # [B, MB] int32
                                     *, sm_scale=None, return_lse=False):
  """Pure-jnp paged decode attention (gather + einsum, f32 math).

  Tokens at positions >= lengths[b] are masked with `where`, so whatever the
  unused blocks hold (NaN included) cannot reach the output; a sequence of
  length 0 yields zeros. Returns [B, Hq, D] in q.dtype.
  """
  _check_args(q, k_pool, v_pool, lengths, block_tables, None, None)
  B, Hq, D = q.shape
  Hkv, _, bs, _ = k_pool.shape
  MB = block_tables.shape[1]
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else sm_scale
  k = k_pool[:, block_tables].reshape(Hkv, B, MB * bs, D)               # [K, B, T, D]
  v = v_pool[:, block_tables].reshape(Hkv, B, MB * bs, D)               # [K, B, T, D]
  valid = jnp.arange(MB * bs)[None, :] < lengths[:, None]               # [B, T]
  q4 = q.reshape(B, Hkv, Hq // Hkv, D)
  hi = jax.lax.Precision.HIGHEST  # the reference is exact: no TF32 on GPUs (whatever the process chose)
  s = jnp.einsum("bkgd,kbtd->bkgt", q4, k, preferred_element_type=jnp.float32, precision=hi) * scale
  s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  v = jnp.where(valid[None, :, :, None], v, jnp.zeros_like(v))
  o = jnp.einsum("bkgt,kbtd->bkgd", p, v.astype(jnp.float32), precision=hi)
  o = o / jnp.where(l > 0, l, 1.0)
  if return_lse:  # natural-log log-sum-exp of the scaled scores, [B, Hq]; -inf when empty
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return o.reshape(B, Hq, D).astype(q.dtype), lse.reshape(B, Hq)
  return o.reshape(B, Hq, D).astype(q.dtype)


def resolve_tile(q, k_pool, block_tables, *, backend="auto", interpret=False, chunk_tokens=None,
                 num_splits=None, streams=None):
  """What a `paged_decode_attention` call with these shapes and static args runs: (backend after
  fallbacks, KVPartition with the default tile filled in), the partition None on the reference
  path. Reads shapes and dtypes only (jax.ShapeDtypeStructs will do)."""
  return _plan(q, k_pool, block_tables, backend, interpret, chunk_tokens, num_splits, streams)


def _plan(q, k_pool, block_tables, backend, interpret, chunk_tokens, num_splits, streams):
  backend = "interpret" if interpret else _resolve_backend(backend)
  B, Hq, D = q.shape
  Hkv, _, bs, _ = k_pool.shape
  if backend == "mosaic":
    if not mgpu.mgpu_supported(q.dtype, D, Hq // Hkv, bs):
      backend = "triton" if jax.default_backend() == "gpu" else "reference"
  if backend == "reference":
    return backend, None
  MB = block_tables.shape[1]
  if backend == "mosaic":
    num_splits, streams, chunk_tokens = _mosaic_tile(B, Hkv, D, bs, MB, chunk_tokens, num_splits,
                                                     streams)
  elif chunk_tokens is None:
    chunk_tokens = 64
  streams = 1 if streams is None else streams
  if backend == "mosaic" and chunk_tokens % 64:
    raise ValueError(f"the mosaic kernel streams chunks of a multiple of 64 tokens (its wgmma tiles), "
                     f"got chunk_tokens={chunk_tokens}")
  if backend == "mosaic" and not 1 <= streams <= MAX_STREAMS:
    raise ValueError(f"the mosaic kernel runs 1 to {MAX_STREAMS} streams (warpgroups) per program, "
                     f"got streams={streams}")
  return backend, KVPartition.choose(batch=B, kv_heads=Hkv, block_size=bs, max_blocks=MB,
                                     chunk_tokens=chunk_tokens, num_splits=num_splits, streams=streams)


def _mosaic_tile(B, Hkv, D, bs, MB, chunk_tokens, num_splits, streams):
  """Default tile of the Mosaic kernel (each None is chosen; measured on the H100, kernel notes):
  one program per (sequence, kv head) writing its rows itself when there are enough of them
  (>= 128; 80-127 with two warpgroups each, up to 2048 tokens); 4 splits of 64-token chunks for
  48-79 (up to 2048 tokens); below that, or for longer contexts, splits for about 264 programs.
  Splits are merged by a combine. Chunks of 128 tokens, or 64 where 128 would not fit shared
  memory at 2 stages."""
  programs = B * Hkv
  if num_splits is None and streams is None:
    short = MB * bs <= 2048
    if programs >= 128:
      num_splits, streams = 1, 1
    elif short and programs >= 80:
      num_splits, streams = 1, 2
    elif short and programs >= 48:
      num_splits, streams = 4, 1
      chunk_tokens = 64 if chunk_tokens is None else chunk_tokens
  streams = 1 if streams is None else streams
  if chunk_tokens is None:
    chunk_tokens = 128
    part = KVPartition.choose(batch=B, kv_heads=Hkv, block_size=bs, max_blocks=MB,
                              chunk_tokens=chunk_tokens, num_splits=num_splits, streams=streams)
    if mgpu.smem_bytes(part, D, stages=2) > mgpu.MAX_SMEM_BYTES:
      chunk_tokens = 64
  return num_splits, streams, chunk_tokens


def decode_descriptors(q,             # [B, Hq, D] (shape and dtype only)
                       k_pool,        # [Hkv, N, bs, D] (shape only)
                       lengths,       # [B] int32
                       block_tables,  # [B, MB] int32
                       groups,        # [B, G, 3] int32
                       num_groups,    # [B] int32
                       *, backend="auto", interpret=False, chunk_tokens=None, num_splits=None,
                       streams=None):
  """The kernels' descriptor rows [B, S, W] int32 for these inputs (None on the reference path).

  Build them once and pass them as `desc=` to every `paged_decode_attention` call over the same
  block tables with the same static args (backend, chunk_tokens, num_splits, streams: the
  layers of one decode step), each call with its own
  `block_offset`: one small XLA kernel per step instead of one per layer. q and k_pool may be
  jax.ShapeDtypeStructs.
  """
  _, part = _plan(q, k_pool, block_tables, backend, interpret, chunk_tokens, num_splits, streams)
  if part is None:
    return None
  return build_descriptors(lengths, block_tables, groups, num_groups, part)


def _table_plan(backend, block_tables) -> bool:
  """Whether the kernel reads lengths and block tables itself (no descriptor kernel)."""
  if backend != "mosaic":
    return False
  return mgpu.table_plan_ok(block_tables.shape[1])


def _offset_row(offset: int) -> np.ndarray:
  """[DESC_COLS] int32 literal with the block offset in word 0. The other words count 1, 2, ...
  (unread): XLA turns a constant whose words are all equal into a broadcast kernel."""
  row = np.arange(DESC_COLS, dtype=np.int32)
  row[0] = offset
  return row


def _offset_arg(block_offset):
  """A public wrapper's block_offset as the jitted function takes it: a Python int 0 -> None, any
  other int -> a numpy row (`_offset_row`), arrays as they are."""
  if isinstance(block_offset, (int, np.integer)):
    return None if block_offset == 0 else _offset_row(block_offset)
  return block_offset


def _base_row(block_offset):
  """Inside the jit: the [DESC_COLS] int32 row the kernels read the offset from (word 0), or None."""
  if block_offset is None:  # a literal 0
    return None
  block_offset = jnp.asarray(block_offset, jnp.int32)
  return jnp.broadcast_to(block_offset, (DESC_COLS,)) if block_offset.ndim == 0 else block_offset


def paged_decode_attention(q, k_pool, v_pool, lengths, block_tables, groups, num_groups, *,
                           block_offset=0, **kw):
  # A Python int offset becomes a numpy constant row here, outside the jit, so that no kernel
  # builds it per call (`_offset_row`).
  # A literal 0 (the default) passes None: the Mosaic kernel then skips reading an offset at all.
  return _paged_decode_attention(q, k_pool, v_pool, lengths, block_tables, groups, num_groups,
                                 block_offset=_offset_arg(block_offset), **kw)


@functools.partial(jax.jit, static_argnames=("sm_scale", "backend", "interpret", "chunk_tokens",
                                             "num_splits", "streams", "stages", "num_warps",
                                             "return_lse"))
def _paged_decode_attention(q,             # [B, Hq, D]
                            k_pool,        # [Hkv, N, bs, D]
                            v_pool,        # [Hkv, N, bs, D]
                            lengths,       # [B] int32
                            block_tables,  # [B, MB] int32
                            groups,        # [B, G, 3] int32 (phys_start, logical_start, blocks)
                            num_groups,    # [B] int32
                            *, block_offset=0, desc=None, sm_scale=None, backend="auto",
                            interpret=False, chunk_tokens=None, num_splits=None, streams=None,
                            stages=2, num_warps=4, return_lse=False):
  """Decode attention of one new token per sequence over a paged KV pool.

  Flash-decoding: the KV axis of each (sequence, kv head) is cut into chunks
  of `chunk_tokens` (whole blocks) spread over `num_splits` programs; a chunk
  inside one transfer group is read as one contiguous copy, any other chunk
  block by block through `block_tables`. Per-split partial results are merged
  in f32. GQA: q head h reads kv head h // (Hq // Hkv).

  block_offset: int or int32 scalar (or a [DESC_COLS] int32 row holding it
  in word 0) added to every physical block id (block tables and group starts) inside the
  kernel, e.g. layer * N to read one layer of a pool flattened to
  [Hkv, L * N, bs, D] without a per-layer id array.
  desc: descriptor rows from `decode_descriptors` (same inputs and static
  args; a decode step builds them once for all its layers); when None, the
  Mosaic kernel plans from lengths and block tables itself (MB % 4 == 0: one
  kernel per call), other kernels get them built here.
  backend: "reference" (pure jnp), "interpret" (generic Pallas kernel in
  interpret mode), "mosaic" (Mosaic GPU, Hopper, bf16/f16, D % 64 == 0),
  "triton" (generic Pallas kernel on the Triton backend), "auto" (mosaic on
  Hopper, triton on other GPUs, reference on CPU). interpret=True forces the
  generic kernel in interpret mode.
  Tile args (static): chunk_tokens, num_splits, streams (online-softmax
  streams per program, merged inside it: Mosaic warpgroups, default 1),
  stages (Mosaic SMEM ring depth, per stream), num_warps (Triton). With one
  split the Mosaic kernel writes the output itself (no combine kernel).
  Returns [B, Hq, D] in q.dtype; inactive slots (length 0) get zeros.
  return_lse: also return the natural-log log-sum-exp of each q head's scaled
  scores, [B, Hq] f32 (-inf when empty), to merge further keys (far-history
  summaries) outside the kernel.
  """
  _check_args(q, k_pool, v_pool, lengths, block_tables, groups, num_groups)
  backend, part = _plan(q, k_pool, block_tables, backend, interpret, chunk_tokens, num_splits,
                        streams)
  B, Hq, D = q.shape
  Hkv, N, bs, _ = k_pool.shape
  G = Hq // Hkv
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
  base = _base_row(block_offset)
  if part is None:
    tables = block_tables if base is None else block_tables + base[0]
    return paged_decode_attention_reference(q, k_pool, v_pool, lengths, tables,
                                            sm_scale=scale, return_lse=return_lse)
  if desc is None:
    if _table_plan(backend, block_tables):
      # The Mosaic kernel plans its chunks itself. Inside a jit, XLA may hand it a slice of a
      # larger array as a pointer into that array (dynamic-slice fusion), which the Mosaic call
      # refuses unless 256-byte aligned; through the barrier a slice becomes an array of its own
      # (no copy for any other array).
      desc = lax.optimization_barrier((lengths, block_tables))
    else:
      desc = build_descriptors(lengths, block_tables, groups, num_groups, part)  # [B, S, W]
  elif desc.shape != (B, part.num_splits, part.desc_width) or desc.dtype != jnp.int32:
    raise ValueError(f"desc {desc.dtype}{list(desc.shape)} was not built for this configuration "
                     f"(expected int32[{B}, {part.num_splits}, {part.desc_width}]): build it with "
                     "decode_descriptors() and the same static args")
  if backend == "mosaic":
    mgpu.check_smem(part, D, stages, jnp.dtype(q.dtype).itemsize)
    o, lse = mgpu.decode_partials_mgpu(desc, base, q, k_pool.reshape(Hkv, N * bs, D),
                                       v_pool.reshape(Hkv, N * bs, D), part=part,
                                       sm_scale=scale, stages=stages)
    if part.num_splits == 1:  # the kernel wrote the final rows: no combine, no convert
      return o if not return_lse else (o, (lse[:, :, 0, :G] * math.log(2.0)).reshape(B, Hq))
  else:
    q4 = q.reshape(B, Hkv, G, D)
    qp = max(16, 1 << (G - 1).bit_length())  # tl.dot needs >= 16 rows
    q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, qp - G), (0, 0)))
    if base is None:
      base = _offset_row(0)
    o, lse = _generic_call(desc, base, q4, k_pool, v_pool, part=part, sm_scale=scale,
                           interpret=(backend == "interpret"), num_warps=num_warps)
  # Slice first so XLA fuses the slice into the combine's reduction; the output and its
  # log-sum-exp come out of one reduction over the splits.
  out, lse2 = combine_splits(o[..., :G, :], lse[..., :G])               # [B, K, G, D], [B, K, G]
  out = out.reshape(B, Hq, D).astype(q.dtype)
  if not return_lse:
    return out
  return out, (lse2 * math.log(2.0)).reshape(B, Hq)


paged_decode_attention.__doc__ = _paged_decode_attention.__doc__


# ----------------------------------------------------------------------------- query tiles

def _check_tile_args(q, k_pool, v_pool, starts, lengths, block_tables):
  if q.ndim != 4:
    raise ValueError(f"q must be [N, Tq, Hq, D], got shape {q.shape}")
  N = q.shape[0]
  _check_args(q[:, 0], k_pool, v_pool, lengths, block_tables, None, None)
  if starts.shape != (N,) or starts.dtype != jnp.int32:
    raise ValueError(f"starts must be int32 [N={N}], got {starts.dtype} {starts.shape}")


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_tile_attention_reference(q,             # [N, Tq, Hq, D]
                                   k_pool,        # [Hkv, P, bs, D]
                                   v_pool,        # [Hkv, P, bs, D]
                                   starts,        # [N] int32
                                   lengths,       # [N] int32
                                   block_tables,  # [N, MB] int32
                                   *, sm_scale=None):
  """Pure-jnp `paged_tile_attention` (gather + einsum, f32 math, exact: HIGHEST precision)."""
  _check_tile_args(q, k_pool, v_pool, starts, lengths, block_tables)
  N, Tq, Hq, D = q.shape
  Hkv, _, bs, _ = k_pool.shape
  G, MB = Hq // Hkv, block_tables.shape[1]
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else sm_scale
  k = k_pool[:, block_tables].reshape(Hkv, N, MB * bs, D)
  v = v_pool[:, block_tables].reshape(Hkv, N, MB * bs, D)
  key = jnp.arange(MB * bs)
  pos = starts[:, None] + jnp.arange(Tq)[None, :]                                      # [N, Tq]
  ok = (key[None, None, :] <= pos[:, :, None]) & (key[None, None, :] < lengths[:, None, None])  # [N, Tq, T]
  hi = jax.lax.Precision.HIGHEST
  q5 = q.reshape(N, Tq, Hkv, G, D)
  s = jnp.einsum("nqkgd,kntd->nqkgt", q5, k, preferred_element_type=jnp.float32, precision=hi) * scale
  s = jnp.where(ok[:, :, None, None, :], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  v = jnp.where((key[None, :] < lengths[:, None])[None, :, :, None], v, jnp.zeros_like(v))
  o = jnp.einsum("nqkgt,kntd->nqkgd", p, v.astype(jnp.float32), precision=hi)
  o = o / jnp.where(l > 0, l, 1.0)
  return o.reshape(N, Tq, Hq, D).astype(q.dtype)


def split_tiles(starts, lengths, block_tables, sub: int, u: int):
  """Each tile of u * sub tokens as u tiles of sub tokens: (starts, lengths, block tables) [N * u].
  A piece's length stops at its last token (start + sub); a piece of padding only gets length 0."""
  st = (starts[:, None] + sub * jnp.arange(u, dtype=jnp.int32)[None, :]).reshape(-1)
  ln = jnp.repeat(lengths, u)
  ln = jnp.where(st < ln, jnp.minimum(ln, st + sub), 0)
  return st, ln, jnp.repeat(block_tables, u, axis=0)


def program_rows(q, kv_heads: int):
  """q [N, t, Hq, D] -> [N, Hkv * t * G, D]: the rows of (tile n, kv head h) together, token-major
  (row r of that group: token r // G, q head h * G + r % G), as the Mosaic kernel reads them."""
  N, t, Hq, D = q.shape
  G = Hq // kv_heads
  return q.reshape(N, t, kv_heads, G, D).transpose(0, 2, 1, 3, 4).reshape(N, kv_heads * t * G, D)


def from_program_rows(o, kv_heads: int, t: int):
  """The inverse of program_rows: [N, Hkv * t * G, D] -> [N, t, Hq, D]."""
  N, R, D = o.shape
  G = R // (kv_heads * t)
  return o.reshape(N, kv_heads, t, G, D).transpose(0, 2, 1, 3, 4).reshape(N, t, kv_heads * G, D)


def tile_backend(q_shape, dtype, k_shape, max_blocks: int, *, backend="auto", interpret=False) -> str:
  """What `paged_tile_attention` runs for these shapes: "mosaic" (Hopper, bf16/f16, D % 64 == 0,
  64 divisible by the q heads per kv head and Tq by 64 / that, MB % 4 == 0), "triton" (other
  GPUs, or Hopper shapes the Mosaic kernel does not take), "interpret" or "reference"."""
  backend = "interpret" if interpret else _resolve_backend(backend)
  N, Tq, Hq, D = q_shape
  Hkv, _, bs, _ = k_shape
  G = Hq // Hkv
  if backend == "mosaic":
    ok = (mgpu.mgpu_supported(dtype, D, G, bs) and mgpu.WG_ROWS % G == 0
          and Tq % (mgpu.WG_ROWS // G) == 0 and mgpu.table_plan_ok(max_blocks))
    if not ok:
      backend = "triton"
  return backend


def paged_tile_attention(q, k_pool, v_pool, starts, lengths, block_tables, *, block_offset=0, **kw):
  return _paged_tile_attention(q, k_pool, v_pool, starts, lengths, block_tables,
                               block_offset=_offset_arg(block_offset), **kw)


# The generic kernel holds a program's query rows (tokens x the G q heads of one kv head) whole in
# shared memory: at most this many elements of them (256 rows at head_dim 128: the 64-token tiles of
# a Llama-3-8B mixed step ran so on an H100, while a 512-token prefill chunk, 2,048 rows, asked for
# 560 KiB of the 227 KiB a block may use). Longer tiles are cut into pieces, as the Mosaic path does.
GENERIC_Q_ELEMS = 256 * 128


def generic_piece_tokens(tq: int, g: int, d: int, max_rows: int | None = None) -> int:
  """Query tokens per program of the generic tile kernel: the whole tile where its tq * g rows fit
  `max_rows` (default GENERIC_Q_ELEMS // d), else as many tokens as fit (at least one)."""
  rows = max_rows or max(1, GENERIC_Q_ELEMS // d)
  return tq if tq * g <= rows else max(1, rows // g)


@functools.partial(jax.jit, static_argnames=("sm_scale", "backend", "interpret", "chunk_tokens", "stages",
                                             "num_warps", "max_rows"))
def _paged_tile_attention(q,             # [N, Tq, Hq, D]
                          k_pool,        # [Hkv, P, bs, D]
                          v_pool,        # [Hkv, P, bs, D]
                          starts,        # [N] int32
                          lengths,       # [N] int32
                          block_tables,  # [N, MB] int32
                          *, block_offset=None, sm_scale=None, backend="auto", interpret=False,
                          chunk_tokens=None, stages=2, num_warps=4, max_rows=None):
  """Causal attention of query tiles over a paged KV pool (prompt chunks of a prefill or mixed step).

  Tile n holds Tq query tokens of one sequence at positions starts[n], starts[n] + 1, ...; token i
  attends to keys 0 .. starts[n] + i of block table row n (its own K/V already written there) and
  to none at or past lengths[n] (the KV length after the tile's last real token; tokens past it are
  padding, with finite rows nobody should read; lengths[n] == 0: an unused tile, zeros).
  GQA: q head h reads kv head h // (Hq // Hkv). block_offset as in paged_decode_attention.

  Mosaic GPU (Hopper): the decode kernel with causal rows: one program per 64 / G tokens of a tile
  and kv head (64 wgmma rows = tokens x the G q heads of that kv head), one split, streaming the
  table's chunks up to the tokens' last position. The generic kernel (Triton on other GPUs,
  interpret mode in CPU tests) runs one program per tile and kv head, cutting tiles whose Tq * G
  rows exceed max_rows (generic_piece_tokens) into pieces. Returns [N, Tq, Hq, D]."""
  _check_tile_args(q, k_pool, v_pool, starts, lengths, block_tables)
  N, Tq, Hq, D = q.shape
  Hkv, P, bs, _ = k_pool.shape
  G, MB = Hq // Hkv, block_tables.shape[1]
  scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
  backend = tile_backend(q.shape, q.dtype, k_pool.shape, MB, backend=backend, interpret=interpret)
  base = _base_row(block_offset)
  if backend == "reference":
    tables = block_tables if base is None else block_tables + base[0]
    return paged_tile_attention_reference(q, k_pool, v_pool, starts, lengths, tables, sm_scale=scale)
  if backend == "mosaic":
    sub = mgpu.WG_ROWS // G  # tokens per program
    u = Tq // sub
    st, ln, tables = split_tiles(starts, lengths, block_tables, sub, u)
    rows = program_rows(q.reshape(N * u, sub, Hq, D), Hkv)
    _, _, chunk_tokens = _mosaic_tile(N * u, Hkv, D, bs, MB, chunk_tokens, 1, 1)  # one split, one stream
    part = KVPartition.choose(batch=N * u, kv_heads=Hkv, block_size=bs, max_blocks=MB,
                              chunk_tokens=chunk_tokens, num_splits=1)
    mgpu.check_smem(part, D, stages, jnp.dtype(q.dtype).itemsize)
    plan = lax.optimization_barrier((ln, tables, st))  # arrays of their own (see _paged_decode_attention)
    o, _ = mgpu.decode_partials_mgpu(plan, base, rows, k_pool.reshape(Hkv, P * bs, D),
                                     v_pool.reshape(Hkv, P * bs, D), part=part, sm_scale=scale,
                                     stages=stages, causal_g=G)
    return from_program_rows(o, Hkv, sub).reshape(N, Tq, Hq, D)
  sub = generic_piece_tokens(Tq, G, D, max_rows)
  u = -(-Tq // sub)
  if u > 1:  # pieces of sub tokens (the last tile's tail padded: pieces past a tile's length are unused)
    starts, lengths, block_tables = split_tiles(starts, lengths, block_tables, sub, u)
    q = jnp.pad(q, ((0, 0), (0, u * sub - Tq), (0, 0), (0, 0))).reshape(N * u, sub, Hq, D)
  n = N * u
  part = KVPartition.choose(batch=n, kv_heads=Hkv, block_size=bs, max_blocks=MB,
                            chunk_tokens=chunk_tokens or 64, num_splits=1)
  desc = build_descriptors(lengths, block_tables, jnp.zeros((n, 1, 3), jnp.int32),
                           jnp.zeros((n,), jnp.int32), part)  # per-block reads through the table
  r = sub * G
  qp = max(16, 1 << (r - 1).bit_length())  # tl.dot needs >= 16 rows (a power of two)
  q4 = program_rows(q, Hkv).reshape(n, Hkv, r, D)
  q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, qp - r), (0, 0)))
  o, _ = _generic_call(desc, _offset_row(0) if base is None else base, q4, k_pool, v_pool, part=part,
                       sm_scale=scale, interpret=(backend == "interpret"), num_warps=num_warps,
                       starts=starts, causal_g=G)
  o = from_program_rows(o[:, :, 0, :r].reshape(n, Hkv * r, D), Hkv, sub).astype(q.dtype)
  return o.reshape(N, u * sub, Hq, D)[:, :Tq]


paged_tile_attention.__doc__ = _paged_tile_attention.__doc__
