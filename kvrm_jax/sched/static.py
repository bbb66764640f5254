"""The static-graph baseline's KV allocator: a dense reservation of `max_seq_len` tokens per slot.

What a static executor does today: reservation r owns blocks 1 + r*MB .. (r+1)*MB of the pool
(the pool holds exactly 1 + S*MB blocks), no paging, no sharing, no compaction. It answers the
BlockPager interface the scheduler uses (a sequence takes the lowest free reservation, as it takes
the lowest free slot), so both run through the same scheduler and the same compiled step. The baseline attends with the same attention backend over its
reservation (masked by length), so a measured gain comes from how many sequences fit a KV budget,
not from a slower kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from kvrm_jax.config import RuntimeConfig


def static_runtime(rt: RuntimeConfig):
  """The baseline's runtime config: a pool of exactly one max_seq_len reservation per slot, and a
  static executor's separate padded prefill and decode calls (no mixed step), every decode step
  over all its slots (each slot owns its reservation: requests never move)."""
  return dataclasses.replace(rt, num_blocks=1 + rt.max_slots * rt.max_blocks_per_seq, max_moves=0,
                             enable_prefix_cache=False, step_tokens=0, decode_buckets=())


class StaticReservation:
  """Fixed per-slot reservations; `allocate` binds a sequence to the lowest free one."""

  def __init__(self, max_slots: int, max_blocks_per_seq: int, block_size: int):
    self.max_slots, self.mb, self.block_size = max_slots, max_blocks_per_seq, block_size
    self._slot: dict[object, int] = {}
    self._tokens: dict[object, int] = {}

  @property
  def max_tokens(self) -> int:
    return self.mb * self.block_size

  @property
  def num_total_blocks(self) -> int:
    return self.max_slots * self.mb

  @property
  def num_used_blocks(self) -> int:
    return len(self._slot) * self.mb  # a whole reservation per admitted sequence

  @property
  def num_free_blocks(self) -> int:
    return self.num_total_blocks - self.num_used_blocks

  def blocks_needed(self, num_tokens: int) -> int:
    return self.mb

  def can_allocate(self, token_ids: Sequence[int]) -> bool:
    return len(self._slot) < self.max_slots and 0 < len(token_ids) <= self.max_tokens

  def allocate(self, seq_id, token_ids: Sequence[int]) -> int:
    if seq_id in self._slot:
      raise ValueError(f"sequence {seq_id!r} is already allocated")
    if len(self._slot) >= self.max_slots:
      raise ValueError(f"all {self.max_slots} reservations are taken")
    slot = min(set(range(self.max_slots)) - set(self._slot.values()))
    if not 0 < len(token_ids) <= self.max_tokens:
      raise ValueError(f"{len(token_ids)} tokens do not fit a reservation of {self.max_tokens}")
    self._slot[seq_id], self._tokens[seq_id] = slot, len(token_ids)
    return 0

  def can_append(self, seq_id, num_tokens: int = 1) -> bool:
    return self._tokens[seq_id] + num_tokens <= self.max_tokens

  def append(self, seq_id, num_tokens: int = 1) -> list[tuple[int, int]]:
    if not self.can_append(seq_id, num_tokens):
      raise ValueError(f"sequence {seq_id!r} exceeds its reservation of {self.max_tokens} tokens")
    self._tokens[seq_id] += num_tokens
    return []

  def commit_tokens(self, seq_id, token_ids: Sequence[int]) -> None:
    pass

  def free(self, seq_id) -> None:
    del self._slot[seq_id], self._tokens[seq_id]

  def has(self, seq_id) -> bool:
    return seq_id in self._slot

  def num_tokens(self, seq_id) -> int:
    return self._tokens[seq_id]

  def block_table(self, seq_id) -> list[int]:
    first = 1 + self._slot[seq_id] * self.mb
    return list(range(first, first + self.mb))

  def runs(self, seq_id) -> list[tuple[int, int, int]]:
    return [(1 + self._slot[seq_id] * self.mb, 0, self.mb)]

  def plan_compaction(self, max_groups: int, max_moves: int) -> list[tuple[int, int]]:
    return []

  def allocate_blank(self, seq_id, num_tokens: int) -> list[int]:
    raise ValueError("the static baseline has no host tier (RuntimeConfig.host_blocks needs the kvrm engine)")

  def drop_blocks(self, seq_id, start: int, n: int) -> None:
    raise ValueError("the static baseline keeps whole reservations (no summaries or host placement)")

  def freed_since_last_call(self) -> list[int]:
    return []

  def stats(self) -> dict:
    return {"free": self.num_free_blocks, "used": self.num_used_blocks, "shared": 0, "prefix_hit_blocks": 0}
