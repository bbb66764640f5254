"""Tiling arithmetic shared by the paged decode-attention kernels.

Both the generic Pallas kernel (interpret mode on CPU, Triton on GPU) and the
Mosaic GPU kernel split the KV axis the same way:

  logical blocks --(chunk_blocks)--> chunks --(chunks_per_split)--> splits

A program (b, kv head, split) streams the chunks of its split. A chunk that
lies inside one transfer group is one contiguous copy of `chunk_blocks` blocks;
any other chunk is `chunk_blocks` per-block copies through the block table.
The per-(sequence, split) facts a program needs are packed by
`build_descriptors` into one int32 row, so a kernel reads them with one copy;
or a kernel reads its block-table slice itself and finds the contiguous chunks
with `table_chunk_source` (the Mosaic kernel's default: no descriptor kernel).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
from jax import lax
import numpy as np

from pallas_kernels.runs import coalesce_runs

# Row layout of a descriptor: [length, src[0:cps], blocks[0:cps*chunk_blocks], pad].
DESC_LENGTH = 0
DESC_SRC = 1
DESC_COLS = 64  # the Mosaic kernel views a row as [W / DESC_COLS, DESC_COLS]


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class KVPartition:
  """How one sequence's KV axis is cut into chunks and splits (all static)."""
  block_size: int        # tokens per physical block
  max_blocks: int        # block-table width (MB)
  chunk_blocks: int      # blocks per chunk (one pipeline stage)
  num_splits: int        # programs per (sequence, kv head) along the KV axis
  streams: int = 1       # online-softmax streams per program: chunk i of a split goes to
                         # stream i % streams (a Mosaic warpgroup each); merged in the program

  def __post_init__(self):
    for name in ("block_size", "max_blocks", "chunk_blocks", "num_splits", "streams"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_splits > self.num_chunks:
      raise ValueError(f"num_splits={self.num_splits} > num_chunks={self.num_chunks}")

  @property
  def chunk_tokens(self) -> int:
    return self.chunk_blocks * self.block_size

  @property
  def num_chunks(self) -> int:
    return _cdiv(self.max_blocks, self.chunk_blocks)

  @property
  def chunks_per_split(self) -> int:
    return _cdiv(self.num_chunks, self.num_splits)

  @property
  def padded_chunks(self) -> int:
    return self.num_splits * self.chunks_per_split

  @property
  def desc_width(self) -> int:
    # Power of two >= DESC_COLS int32: whole rows of the 2-D [W / 64, 64] view the
    # Mosaic kernel copies (a TMA box is <= 256 per dim, bytes % 128 == 0) and a
    # legal Triton block.
    used = 1 + self.chunks_per_split * (1 + self.chunk_blocks)
    return max(DESC_COLS, _next_pow2(used))

  @property
  def desc_blocks(self) -> int:
    """Offset of the block ids inside a descriptor row."""
    return DESC_SRC + self.chunks_per_split

  def stream_chunks(self, n, stream):
    """How many of a split's first n chunks stream `stream` owns (chunks stream, stream +
    streams, ...); n may be traced."""
    num = n + (self.streams - 1 - stream)
    if isinstance(num, int):
      return num // self.streams
    return lax.div(num, jnp.int32(self.streams))  # num >= 0

  @classmethod
  def choose(cls, *, batch: int, kv_heads: int, block_size: int, max_blocks: int,
             chunk_tokens: int = 128, num_splits: int | None = None, streams: int = 1,
             target_programs: int = 264) -> "KVPartition":
    """Picks chunk size and split count for a static configuration.

    chunk_tokens is rounded to whole blocks; num_splits (if None) is the
    smallest count giving about `target_programs` streams (2 per H100 SM),
    counting `streams` per program.
    """
    chunk_blocks = max(1, chunk_tokens // block_size)
    num_chunks = _cdiv(max_blocks, chunk_blocks)
    if num_splits is None:
      num_splits = _cdiv(target_programs, max(1, batch * kv_heads * streams))
    num_splits = max(1, min(num_splits, num_chunks))
    # Re-derive so that no split is empty by construction.
    cps = _cdiv(num_chunks, num_splits)
    num_splits = _cdiv(num_chunks, cps)
    return cls(block_size, max_blocks, chunk_blocks, num_splits, max(1, min(streams, cps)))


def chunk_sources(groups, num_groups, part: KVPartition):
  """Physical start block of each chunk that lies inside one transfer group.

  groups: [B, G, 3] int32 (phys_start, logical_start, num_blocks);
  num_groups: [B] int32 (0 = fragmented, use the block table).
  Returns [B, padded_chunks] int32, -1 where the chunk needs per-block copies.
  Elementwise over the G groups (no reduction), so XLA fuses it with the rest of
  `build_descriptors` into one kernel.
  """
  cb = part.chunk_blocks
  lo = jnp.arange(part.padded_chunks, dtype=jnp.int32)[None, :] * cb   # [1, C]
  src = jnp.full((groups.shape[0], part.padded_chunks), -1, jnp.int32)  # [B, C]
  for g in range(groups.shape[1]):
    ps, ls, nb = (groups[:, g, i][:, None] for i in range(3))           # [B, 1]
    inside = (g < num_groups[:, None]) & (ls <= lo) & (ls + nb >= lo + cb)
    src = jnp.maximum(src, jnp.where(inside, ps + (lo - ls), -1))
  return src.astype(jnp.int32)


def table_chunk_source(block, i, cb: int, nvalid, limit):
  """Physical start block of chunk i when its valid blocks are physically consecutive, else -1.

  The rule a kernel applies to its own block-table row (no descriptor): block(k) is the k-th block
  id of the split (scalar, traced or not), nvalid how many of the split's blocks hold tokens, and
  limit the pool's block count (a contiguous copy of cb blocks from the start must stay inside
  it). Blocks past the valid ones are not compared: their tokens are masked, whatever they hold.
  Finds every chunk `chunk_sources` finds from maximal transfer groups, and the tail chunks they
  do not cover.
  """
  b0 = block(i * cb)
  ok = b0 + cb <= limit
  for j in range(1, cb):
    ok = ok & ((block(i * cb + j) == b0 + j) | (i * cb + j >= nvalid))
  return jnp.where(ok, b0, -1)


def build_descriptors(lengths, block_tables, groups, num_groups, part: KVPartition):
  """Packs what program (b, *, split) needs into desc[b, split]: [B, S, W] int32."""
  B, MB = block_tables.shape
  S, cps, cb = part.num_splits, part.chunks_per_split, part.chunk_blocks
  src = chunk_sources(groups, num_groups, part).reshape(B, S, cps)     # [B, S, cps]
  pad = S * cps * cb - MB
  bt = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, pad)))   # padding = null block 0
  bt = bt.reshape(B, S, cps * cb)                                       # [B, S, cps*cb]
  ln = jnp.broadcast_to(lengths.astype(jnp.int32)[:, None, None], (B, S, 1))
  desc = jnp.concatenate([ln, src, bt], axis=-1)
  return jnp.pad(desc, ((0, 0), (0, 0), (0, part.desc_width - desc.shape[-1])))


def combine_splits(o, lse):
  """Merges per-split partial attention (flash-decoding's second step).

  o: [B, K, S, QP, D] f32, each split normalised by its own softmax sum;
  lse: [B, K, S, QP] f32 base-2 log-sum-exp of each split (-inf = empty split).
  Returns (o [B, K, QP, D] f32, lse [B, K, QP] f32 base 2): rows whose splits
  are all empty get o = 0 and lse = -inf. One split passes through unchanged.
  """
  if o.shape[2] == 1:
    return o[:, :, 0], lse[:, :, 0]
  return merge_lse([o[:, :, i] for i in range(o.shape[2])], [lse[:, :, i] for i in range(o.shape[2])])


def normalize_stream(acc, m, l):
  """(o, lse) of one online-softmax stream: acc [R, D] f32 unnormalised output, m [R] its running
  max and l [R] its sum (base-2 exponents). Empty rows (l == 0) get o = 0 and lse = -inf.
  Both kernels end every stream with it before `merge_lse`."""
  has = l > 0
  safe = jnp.where(has, l, jnp.ones_like(l))
  o = acc / lax.broadcast_in_dim(safe, acc.shape, (0,))
  # log * (1 / ln 2): Mosaic GPU lowers log, not log2.
  return o, jnp.where(has, m + jnp.log(safe) * (1 / math.log(2)), jnp.full_like(m, -jnp.inf))


def merge_lse(os, lses, *, base2: bool = True):
  """Merges normalised partial attentions over disjoint keys by their log-sum-exp: os[i] [..., R, D],
  lses[i] [..., R] (-inf = empty), base 2 (the kernels) or natural (base2=False: the engine's host
  tier and summary rows). Returns (o [..., R, D], lse [..., R]); all-empty rows get o = 0 and
  lse = -inf, and a side without keys leaves the other's o bit for bit. The split combine, the
  kernels' in-program stream merge, the host tier and the summaries all use it."""
  exp, log = (jnp.exp2, jnp.log2) if base2 else (jnp.exp, jnp.log)
  # A floor instead of isfinite (which Mosaic GPU does not lower): all-empty rows then weigh
  # exp(-inf) = 0 instead of NaN.
  mx = jnp.maximum(functools.reduce(jnp.maximum, lses), -1e30)
  ws = [exp(l - mx) for l in lses]
  den = functools.reduce(jnp.add, ws)
  num = functools.reduce(jnp.add, [o * lax.broadcast_in_dim(w, o.shape, tuple(range(w.ndim)))
                                   for o, w in zip(os, ws)])
  has = den > 0
  safe = jnp.where(has, den, jnp.ones_like(den))
  out = num / lax.broadcast_in_dim(safe, num.shape, tuple(range(safe.ndim)))
  return out, jnp.where(has, mx + log(safe), jnp.full_like(mx, -jnp.inf))


def make_transfer_groups(block_tables: np.ndarray, lengths: np.ndarray, block_size: int,
                         max_groups: int):
  """Host-side (numpy) transfer groups from block tables, for tests and benchmarks.

  Returns groups [B, G, 3] int32 and num_groups [B] int32; a sequence with more
  than `max_groups` runs (or no blocks) gets num_groups = 0.
  """
  B = block_tables.shape[0]
  groups = np.zeros((B, max_groups, 3), np.int32)
  num_groups = np.zeros((B,), np.int32)
  for b in range(B):
    runs = coalesce_runs([int(p) for p in block_tables[b, :_cdiv(int(lengths[b]), block_size)]])
    if 0 < len(runs) <= max_groups:
      groups[b, :len(runs)] = runs
      num_groups[b] = len(runs)
  return groups, num_groups


__all__ = ["KVPartition", "chunk_sources", "table_chunk_source", "build_descriptors",
           "combine_splits", "normalize_stream", "merge_lse", "make_transfer_groups"]
