"""The committed per-step descriptor: every input that changes from step to step, packed on the host
into one int32 buffer and one float32 buffer whose sizes depend only on the RuntimeConfig.

Host side (numpy): a `*Layout` names the fields and their shapes; `pack` writes a dict of arrays
into the two buffers. Device side: `unpack` slices them back (static offsets) into a registered
dataclass. One `device_put` of the (ints, floats) pair per step is the only host->device transfer.
"""

from __future__ import annotations

import dataclasses
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

  @property
  def int_size(self) -> int:
    return sum(math.prod(s) for _, s in self.ints)

  @property
  def float_size(self) -> int:
    return sum(math.prod(s) for _, s in self.floats)

  def new(self) -> dict[str, np.ndarray]:
    """Zero-filled host arrays for every field (0 = null block / inactive / greedy)."""
    d = {n: np.zeros(s, np.int32) for n, s in self.ints}
    d.update({n: np.zeros(s, np.float32) for n, s in self.floats})
    return d

  def pack(self, fields: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
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


def decode_layout(rt: RuntimeConfig) -> Layout:
  s, mb, g, m = rt.max_slots, rt.max_blocks_per_seq, rt.max_groups, rt.max_moves
  return Layout(
      ints=(
          ("tokens", (s,)),  # [S] input token per slot
          ("positions", (s,)),  # [S] position of that token
          ("lengths", (s,)),  # [S] KV length after writing it; 0 = inactive slot
          ("write_slots", (s,)),  # [S] flat pool slot (block * block_size + offset) for its KV
          ("block_tables", (s, mb)),  # [S, MB] physical block ids in logical order, 0-padded
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


def prefill_layout(rt: RuntimeConfig, chunk: int) -> Layout:
  p, mb = rt.max_prefill_seqs, rt.max_blocks_per_seq
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
