"""Transfer groups: maximal runs of physically contiguous blocks of a block table (plain Python,
no JAX: the host pager and the kernels' partition share it)."""

from __future__ import annotations

from typing import Sequence


def coalesce_runs(block_table: Sequence[int]) -> list[tuple[int, int, int]]:
  """Maximal runs of physically contiguous blocks of a block table, in logical order.

  Returns (phys_start_block, logical_start_block, num_blocks) per run.
  """
  runs = []
  start = n = 0
  prev = -2
  for i, b in enumerate(block_table):
    if b != prev + 1:
      if n:
        runs.append((start, i - n, n))
      start, n = b, 0
    n += 1
    prev = b
  if n:
    runs.append((start, len(block_table) - n, n))
  return runs
