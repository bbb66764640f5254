"""Bounded far-history summaries (optional), host-side policy and planning.

A sequence keeps its first `sink_blocks` blocks and its last `window` tokens exact. Full blocks
in between are folded into at most `max_entries` summary rows: the mean key and value of the
folded tokens, entering attention with a log(count) bias so a row's softmax mass matches the
tokens it stands for. Summary rows live in one ordinary pool block per sequence; the exact
history's blocks are freed as they fold, so a sequence holds at most
sink_blocks + ceil(window / block_size) + 1 exact blocks, plus its summary block, however long it
runs. `max_entries=0` is the StreamingLLM baseline: far blocks are dropped, not summarized.

The decode step is the same executable with summaries on or off: its descriptor always carries
the summary rows (count 0 = unused) and the fold list (weight 0 = no-op).
"""

from __future__ import annotations

import dataclasses

from kvrm_jax.sched.pager import OutOfBlocks


@dataclasses.dataclass(frozen=True)
class SummaryConfig:
  sink_blocks: int = 1
  window: int = 256  # tokens kept exact at the end of the history
  max_entries: int = 4  # summary rows per sequence (<= RuntimeConfig.max_summaries); 0 = drop

  def __post_init__(self):
    if self.sink_blocks < 0 or self.window < 1 or self.max_entries < 0:
      raise ValueError(f"invalid summaries {self}: need sink_blocks >= 0, window >= 1, max_entries >= 0")

  @classmethod
  def parse(cls, text: str) -> "SummaryConfig":
    """'sink=1,window=256,max=4' (the --summaries flag)."""
    keys = {"sink": "sink_blocks", "window": "window", "max": "max_entries"}
    kw = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
      k, _, v = part.partition("=")
      if k not in keys or not v:
        raise ValueError(f"bad --summaries item {part!r}: expected sink=N,window=N,max=N")
      try:
        kw[keys[k]] = int(v)
      except ValueError:
        raise ValueError(f"bad --summaries value {part!r}: not an integer") from None
    return cls(**kw)


def fold_targets(counts: list[int], n: int, max_entries: int) -> list[int]:
  """Summary entries for n blocks folded in one step, all distinct: new entries first, then the
  entries holding the fewest tokens (newest first on ties)."""
  out = []
  free = max_entries - len(counts)
  out += list(range(len(counts), len(counts) + min(n, free)))
  rest = n - len(out)
  if rest > 0:
    by_count = sorted(range(len(counts)), key=lambda j: (counts[j], -j))
    out += by_count[:rest]
  return out


def plan_folds(sched, decode) -> list[tuple[int, int, float, float]]:
  """Fold (or drop) the full blocks between the sinks and the exact window of each decoding
  request and free them; returns the step's folds (src block, dst flat slot, w_old, w_new).
  `sched` is the Scheduler (kvrm_jax/sched/scheduler.py), whose slots and allocator this updates."""
  sl, alloc = sched.slots, sched.allocator
  if sched.summaries is None and not sl.own_summaries:
    return []  # no request folds anything: skip the walk over every decoding request
  bs = sched.rt.block_size
  budget = sched.rt.max_folds
  folds = []
  for req in decode:
    sc = req.summaries or sched.summaries
    if sc is None:
      continue
    s = req.slot
    folded = int(sl.folded[s])
    total = req.num_computed + 1  # tokens once this step's token is written
    nblocks = -(-(total - folded) // bs)
    first_window = max(0, total - sc.window) // bs - folded // bs  # table index
    excess = min(first_window, nblocks - 1) - sc.sink_blocks
    if excess <= 0:
      continue
    n = excess
    if sc.max_entries:
      n = min(n, sc.max_entries, budget)
      if n <= 0:
        continue
      if sl.sum_base[s] < 0:
        try:
          alloc.allocate(("sum", req.id), [0])
        except OutOfBlocks:
          continue  # stays exact for now; folds once blocks free up
        sl.sum_base[s] = alloc.block_table(("sum", req.id))[0] * bs
      base = int(sl.sum_base[s])
      counts = [int(c) for c in sl.sum_counts[s] if c > 0]  # used rows are a prefix
      for i, j in enumerate(fold_targets(counts, n, sc.max_entries)):
        if j == len(counts):
          counts.append(0)
        c = counts[j]
        folds.append((int(sl.bt[s, sc.sink_blocks + i]), base + j, c / (c + bs), bs / (c + bs)))
        counts[j] = c + bs
        sl.sum_counts[s, j] = c + bs
      budget -= n
    alloc.drop_blocks(req.id, sc.sink_blocks, n)
    sl.folded[s] += n * bs
    sched.refresh(req)
  return folds
