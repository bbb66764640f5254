"""The committed per-step descriptor, the one meeting point of the host half (kvrm_jax/sched/) and
the device half (kvrm_jax/step/): every input that changes from step to step, packed on the host
into one int32 buffer and one float32 buffer whose sizes depend only on the RuntimeConfig.

Every layout (decode, prefill, mixed, the host tier's swap) and its host builder live here. A `Layout`
names the fields and their shapes; the builders fill them from the scheduler's plan and slots and
`pack` writes them into the two buffers; on the device `unpack` slices them back (static offsets).
One `device_put` of the (ints, floats) pair per step is the only host->device transfer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from kvrm_jax.config import RuntimeConfig

Fields = tuple[tuple[str, tuple[int, ...]], ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Field names and shapes of one descriptor kind, and their offsets in the two buffers."""

  ints: Fields
  floats: Fields

  @staticmethod
  def _offsets(fields: Fields) -> dict[str, tuple[int, tuple[int, ...]]]:
    out, off = {}, 0
    for name, shape in fields:
      out[name] = (off, shape)
      off += math.prod(shape)
    return out

  @functools.cached_property
  def int_size(self) -> int:
    return sum(math.prod(s) for _, s in self.ints)

  @functools.cached_property
  def float_size(self) -> int:
    return sum(math.prod(s) for _, s in self.floats)

  @functools.cached_property
  def _views(self) -> tuple[tuple[bool, str, int, int, tuple[int, ...]], ...]:
    # (a float field?, name, offset, end, shape) of every field in its buffer.
    return tuple((fields is self.floats, n, off, off + math.prod(shape), shape)
                 for fields in (self.ints, self.floats) for n, (off, shape) in self._offsets(fields).items())

  def new(self) -> dict[str, np.ndarray]:
    """Zero-filled host arrays for every field (0 = null block / inactive / greedy): views into the
    two packed buffers, so filling them in place is packing them (`pack` copies nothing then)."""
    d = _Packed(np.zeros((self.int_size,), np.int32), np.zeros((self.float_size,), np.float32), self)
    bufs = (d.ints, d.floats)
    for is_float, n, off, end, shape in self._views:
      d[n] = bufs[is_float][off:end].reshape(shape)
    return d

  def pack(self, fields: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ints, floats) of `fields`: the buffers themselves for a dict from `new()` (its fields are
    views into them), else the fields concatenated in layout order."""
    if isinstance(fields, _Packed) and fields.layout is self:
      return fields.ints, fields.floats
    ints = np.concatenate([np.asarray(fields[n], np.int32).reshape(-1) for n, _ in self.ints])
    floats = np.concatenate([np.asarray(fields[n], np.float32).reshape(-1) for n, _ in self.floats]) \
        if self.floats else np.zeros((0,), np.float32)
    return ints, floats

  def unpack(self, ints: jax.Array, floats: jax.Array) -> dict[str, jax.Array]:
    out = {}
    for buf, fields in ((ints, self.ints), (floats, self.floats)):
      for name, (off, shape) in self._offsets(fields).items():
        out[name] = buf[off:off + math.prod(shape)].reshape(shape)
    return out


class _Packed(dict):
  """Layout.new()'s fields: views into the two buffers `pack` returns (write them in place)."""

  def __init__(self, ints: np.ndarray, floats: np.ndarray, layout: Layout):
    super().__init__()
    self.ints, self.floats, self.layout = ints, floats, layout


@functools.cache  # layouts are immutable: built once per configuration, not per step
def decode_layout(rt: RuntimeConfig, rows: int | None = None) -> Layout:
  """The decode step's descriptor over `rows` slots (default rt.max_slots; RuntimeConfig.decode_rows)."""
  if rows is not None and rows != rt.max_slots:
    return decode_layout(rows_runtime(rt, rows))
  s, mb, g, m = rt.max_slots, rt.table_width, rt.max_groups, rt.max_moves
  return Layout(
      ints=(
          ("tokens", (s,)),  # [S] input token per slot
          ("positions", (s,)),  # [S] position of that token
          ("lengths", (s,)),  # [S] KV length after writing it; 0 = inactive slot
          ("write_slots", (s,)),  # [S] flat pool slot (block * block_size + offset) for its KV
          ("block_tables", (s, mb)),  # [S, MB] physical block ids in logical order, 0-padded (MB = rt.table_width)
          ("groups", (s, g, 3)),  # [S, G, 3] (phys_start, logical_start, num_blocks) runs
          ("num_groups", (s,)),  # [S] runs used; 0 = more runs than G (use block_tables)
          ("moves", (max(m, 1), 2)),  # [M, 2] block copies (src, dst) run first; (0, 0) = no-op
          ("top_k", (s,)),  # [S] 0 = off
          ("seeds", (s,)),  # [S] per-request sampling seed
          ("folds", (max(rt.max_folds, 1), 2)),  # [F, 2] (src block, dst flat slot) summary folds, run first
          ("summary_slots", (s, max(rt.max_summaries, 1))),  # [S, Ks] flat pool slots of summary rows
      ) + _host_read_fields(rt),
      floats=(
          ("temperature", (s,)),  # [S] 0 = greedy
          ("top_p", (s,)),  # [S] 1 = off
          ("fold_w", (max(rt.max_folds, 1), 2)),  # [F, 2] (w_old, w_new); w_new = 0 = no-op
          ("summary_counts", (s, max(rt.max_summaries, 1))),  # [S, Ks] tokens per summary; 0 = unused
      ))


def rows_runtime(rt: RuntimeConfig, rows: int) -> RuntimeConfig:
  """The runtime a decode step of `rows` rows is built from: rt over slots 0..rows-1."""
  return dataclasses.replace(rt, max_slots=rows, decode_buckets=tuple(b for b in rt.decode_buckets if b < rows))


def _host_read_fields(rt: RuntimeConfig) -> Fields:
  """Host tier placement (kvrm_jax/tier.py): host extents the step stages per layer."""
  if not rt.max_host_reads:
    return ()
  return (
      ("host_reads", (rt.max_host_reads,)),  # [X] host extents to stage, in staging order
      ("host_n", (1,)),  # extents used
      ("host_table", (rt.max_slots, rt.max_host_blocks_per_seq)),  # [S, Hm] staged row per host block
      ("host_count", (rt.max_slots,)),  # [S] host-resident blocks per slot
  )


@functools.cache  # layouts are immutable: built once per configuration, not per step
def prefill_layout(rt: RuntimeConfig, chunk: int) -> Layout:
  p, mb = rt.max_prefill_seqs, rt.table_width
  return Layout(
      ints=(
          ("tokens", (p, chunk)),  # [P, C] chunk tokens, 0-padded
          ("positions", (p, chunk)),  # [P, C]
          ("write_slots", (p, chunk)),  # [P, C] flat pool slot per token; padding -> null block
          ("block_tables", (p, mb)),  # [P, MB] whole history of the row's sequence
          ("lengths", (p,)),  # [P] KV length after this chunk; 0 = unused row
          ("last_index", (p,)),  # [P] index in the chunk of the row's last real token
          ("moves", (max(rt.max_moves, 1), 2)),  # [M, 2] block copies run first; (0, 0) = no-op
          ("top_k", (p,)),  # [P]
          ("seeds", (p,)),  # [P]
          ("folds", (max(rt.max_folds, 1), 2)),  # [F, 2] summary folds, run first
      ),
      floats=(
          ("temperature", (p,)),  # [P]
          ("top_p", (p,)),  # [P]
          ("fold_w", (max(rt.max_folds, 1), 2)),  # [F, 2]
      ))


@functools.cache  # layouts are immutable: built once per configuration, not per step
def mixed_layout(rt: RuntimeConfig, n_tiles: int) -> Layout:
  """The decode step's fields (one token per slot), then `n_tiles` query tiles of rt.tile prompt
  tokens, each tile of one sequence (`t_` fields). Block copies and folds are the decode part's."""
  n, q, mb = n_tiles, rt.tile, rt.table_width
  dec = decode_layout(rt)
  return Layout(
      ints=dec.ints + (
          ("t_tokens", (n, q)),  # [N, Q] prompt tokens, 0-padded
          ("t_positions", (n, q)),  # [N, Q]
          ("t_write_slots", (n, q)),  # [N, Q] flat pool slot per token; padding -> null block
          ("t_block_tables", (n, mb)),  # [N, MB] the whole table of the tile's sequence
          ("t_lengths", (n,)),  # [N] KV length after the tile's last token; 0 = unused tile
          ("t_last_index", (n,)),  # [N] index in the tile of its last real token
          ("t_top_k", (n,)),  # [N] the tile's sequence's sampling (used where its prompt ends)
          ("t_seeds", (n,)),
      ),
      floats=dec.floats + (
          ("t_temperature", (n,)),
          ("t_top_p", (n,)),
      ))


def swap_layout(rt: RuntimeConfig) -> Layout:
  """The host tier's swap op: extents copied out then in, each with its device blocks."""
  x, r = max(rt.max_swap_extents, 1), rt.host_extent
  return Layout(ints=(("out_ext", (x,)), ("out_blocks", (x, r)), ("in_ext", (x,)), ("in_blocks", (x, r)),
                      ("counts", (2,))), floats=())


# ----------------------------------------------------------------------------- host builders
# `slots` is the scheduler's Slots (kvrm_jax/sched/slots.py): the per-slot arrays these read.


def put_block_ops(d, moves, folds) -> None:
  """Write block copies and summary folds into a descriptor's padded lists."""
  if moves:
    d["moves"][:len(moves)] = moves
  if folds:
    f = np.asarray(folds, np.float64)
    d["folds"][:len(folds)] = f[:, :2].astype(np.int32)
    d["fold_w"][:len(folds)] = f[:, 2:]


def build_prefill(rt: RuntimeConfig, rows, slots, moves=(), folds=(), buckets=None):
  """(chunk bucket, (ints, floats)) of a prefill step over rows (request, start, n); the chunk is
  the smallest of `buckets` (default rt.prefill_buckets; their largest is always among them) that
  holds the longest row."""
  n_max = max(n for _, _, n in rows)
  chunk = next(b for b in (buckets or rt.prefill_buckets) if b >= n_max)
  layout = prefill_layout(rt, chunk)
  d = layout.new()
  d["top_p"][:] = 1.0
  for i, (req, start, n) in enumerate(rows):
    _put_chunk(d, "", i, req, start, n, slots, rt.block_size)
  put_block_ops(d, moves, folds)
  return chunk, layout.pack(d)


def _put_chunk(d, prefix: str, i: int, req, start: int, n: int, slots, bs: int) -> None:
  """Row i of a prefill descriptor (prefix "") or tile i of a mixed one ("t_"): tokens start..start+n
  of the request's prompt, their pool slots, its block table, KV length and sampling parameters."""
  s = req.slot
  pos = np.arange(start, start + n)
  d[prefix + "tokens"][i, :n] = req.all_ids[start:start + n]
  d[prefix + "positions"][i, :n] = pos
  d[prefix + "write_slots"][i, :n] = slots.bt[s][pos // bs] * bs + pos % bs
  d[prefix + "block_tables"][i] = slots.bt[s]
  d[prefix + "lengths"][i] = start + n
  d[prefix + "last_index"][i] = n - 1
  for f, per_slot in (("temperature", slots.temp), ("top_p", slots.topp), ("top_k", slots.topk), ("seeds", slots.seed)):
    d[prefix + f][i] = per_slot[s]


def tile_bucket(rt: RuntimeConfig, tiles: int, buckets=None) -> int:
  """The smallest mixed-step tile count of `buckets` (default rt.tile_buckets) that holds `tiles` tiles."""
  return next(b for b in (buckets or rt.tile_buckets) if b >= tiles)


def build_mixed(rt: RuntimeConfig, rows, slots, decode_slots, moves=(), folds=(), host_reads=(), buckets=None):
  """(tile bucket, (ints, floats), last tile of each row) of a mixed step: the decode fields of
  `decode_slots` (as build_decode) and the prompt chunks `rows` (request, start, n) cut into tiles,
  in the smallest of `buckets` (default rt.tile_buckets) that holds them."""
  q = rt.tile
  n_tiles = tile_bucket(rt, sum(-(-n // q) for _, _, n in rows), buckets)
  layout = mixed_layout(rt, n_tiles)
  d = layout.new()
  _fill_decode(d, rt, slots, decode_slots, moves, folds, host_reads)
  d["t_top_p"][:] = 1.0
  last_tile, i = [], 0
  for req, start, n in rows:
    for a in range(start, start + n, q):
      _put_chunk(d, "t_", i, req, a, min(q, start + n - a), slots, rt.block_size)
      i += 1
    last_tile.append(i - 1)
  return n_tiles, layout.pack(d), last_tile


def build_decode(layout: Layout, rt: RuntimeConfig, slots, decode_slots, moves=(), folds=(), host_reads=()):
  """(ints, floats) of the decode step, vectorized over `decode_slots` ([n] int32). `layout` is
  decode_layout(rt) or one of its row counts (decode_layout(rt, rows)): slots 0..rows-1.

  host_reads: per decoding slot with blocks on the host tier, (slot, its placed extents, its host
  blocks), the order in which the step stages them."""
  d = layout.new()
  _fill_decode(d, rt, slots, decode_slots, moves, folds, host_reads)
  return layout.pack(d)


def _fill_decode(d, rt: RuntimeConfig, slots, decode_slots, moves, folds, host_reads) -> None:
  """The decode fields of descriptor `d` (build_decode, and the decode part of build_mixed)."""
  bs = rt.block_size
  if len(decode_slots):
    pos = slots.pos[decode_slots]
    rel = pos - slots.table_start(decode_slots)  # position within the exact (table) history
    d["tokens"][decode_slots] = slots.tok[decode_slots]
    d["positions"][decode_slots] = pos
    d["lengths"][decode_slots] = rel + 1
    d["write_slots"][decode_slots] = slots.bt[decode_slots, rel // bs] * bs + pos % bs
  active = d["lengths"] > 0
  r = len(active)  # the step's rows: slots 0..r-1 (RuntimeConfig.decode_rows; decode_slots < r)
  # Rows of free slots are zero; rows of prefilling slots are valid tables read with length 0.
  d["block_tables"][:] = slots.bt[:r]
  d["groups"][:] = slots.groups[:r]
  d["num_groups"][:] = np.where(active, slots.ngroups[:r], 0)
  d["temperature"][:], d["top_p"][:] = slots.temp[:r], slots.topp[:r]
  d["top_k"][:], d["seeds"][:] = slots.topk[:r], slots.seed[:r]
  d["summary_slots"][:], d["summary_counts"][:] = slots.summary_slots()[:r], slots.sum_counts[:r]
  if rt.max_host_reads:
    _put_host_reads(d, rt.host_extent, host_reads)
  put_block_ops(d, moves, folds)


def _put_host_reads(d, extent: int, host_reads) -> None:
  """The extents the decode step stages per layer, and each slot's staged rows."""
  n = 0
  for slot, extents, blocks in host_reads:
    row = {}
    for e in extents:
      d["host_reads"][n] = e
      row[e] = n * extent
      n += 1
    d["host_table"][slot, :len(blocks)] = [row[b // extent] + b % extent for b in blocks]
    d["host_count"][slot] = len(blocks)
  d["host_n"][0] = n


def build_swap(layout: Layout, outs, ins) -> np.ndarray:
  """The swap op's ints: extents copied out, then in, each with its device blocks."""
  d = layout.new()
  for key, lst in (("out", outs), ("in", ins)):
    for i, (e, blocks, _) in enumerate(lst):
      d[f"{key}_ext"][i] = e
      d[f"{key}_blocks"][i, :len(blocks)] = blocks
  d["counts"][:] = len(outs), len(ins)
  return layout.pack(d)[0]
