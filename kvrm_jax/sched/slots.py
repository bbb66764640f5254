"""The one owner of per-slot state: which request sits in each decode slot and everything the
descriptor reads about it, as numpy arrays indexed by slot (so a step's bookkeeping and the
descriptor build are vectorized).

A request in a slot keeps only its identity and output (`Request`); its position, the tokens
folded or placed out of its table, its summary rows and its cached block table live here, one
copy each. Sampling parameters and the next input token are derived from the request when they
change (admission, each emitted token).
"""

from __future__ import annotations

import heapq

import numpy as np

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.sched.request import Request, Status


# Every per-slot array of Slots: a request that moves to another slot takes its row of each.
ROW_ARRAYS = ("temp", "topp", "topk", "seed", "running", "pos", "tok", "cap", "folded", "host", "sum_base",
              "sum_counts", "bt", "groups", "ngroups", "nruns")


class Slots:
  """Per-slot arrays ([S] unless noted) and the slot <-> request mapping."""

  def __init__(self, rt: RuntimeConfig):
    s, mb, ks = rt.max_slots, rt.table_width, max(rt.max_summaries, 1)
    self.rt = rt
    self.reqs: list[Request | None] = [None] * s
    self.order: list[Request] = []  # requests in slots, oldest admission first
    self.prefilling: list[Request] = []  # PREFILL requests, oldest admission first
    self.own_summaries = 0  # requests in slots with summaries of their own (Request.summaries)
    self._free = list(range(s))  # heap: lowest free slot first
    # Sampling parameters of the slot's request (set at admission).
    self.temp = np.zeros((s,), np.float32)
    self.topp = np.ones((s,), np.float32)
    self.topk = np.zeros((s,), np.int32)
    self.seed = np.zeros((s,), np.int32)
    self.running = np.zeros((s,), bool)  # slot holds a RUNNING request
    self.pos = np.zeros((s,), np.int32)  # tokens whose KV is computed (= position of the next input)
    self.tok = np.zeros((s,), np.int32)  # next input token (the last output) of a running request
    self.cap = np.zeros((s,), np.int32)  # tokens its block table holds
    self.folded = np.zeros((s,), np.int32)  # leading tokens folded into summaries or dropped
    self.host = np.zeros((s,), np.int32)  # tokens of its blocks placed on the host tier
    self.sum_base = np.full((s,), -1, np.int32)  # flat pool slot of its summary row 0; -1 = none
    self.sum_counts = np.zeros((s, ks), np.float32)  # [S, Ks] tokens folded into each row; 0 = unused
    self.bt = np.zeros((s, mb), np.int32)  # [S, MB] block table (physical ids, logical order)
    self.groups = np.zeros((s, rt.max_groups, 3), np.int32)  # [S, G, 3] its runs, when they fit G
    self.ngroups = np.zeros((s,), np.int32)  # runs in `groups`; 0 = more than G
    self.nruns = np.zeros((s,), np.int32)  # runs of its table (may exceed G)

  # --------------------------------------------------------------------------- occupancy

  @property
  def has_free(self) -> bool:
    return bool(self._free)

  def next_free(self) -> int:
    return self._free[0]

  def bind(self, req: Request, computed: int, status: Status) -> int:
    """Put `req` in the lowest free slot with `computed` tokens of KV; returns the slot."""
    s = heapq.heappop(self._free)
    req.slot, req.status, req._slots = s, status, self
    self.reqs[s] = req
    self.order.append(req)
    self.own_summaries += req.summaries is not None
    self.pos[s] = computed
    sp = req.sampling
    self.temp[s], self.topp[s], self.topk[s], self.seed[s] = sp.temperature, sp.top_p, sp.top_k, sp.seed
    if status is Status.PREFILL:
      self.prefilling.append(req)
    return s

  def mark_running(self, req: Request) -> None:
    """A request whose prompt KV is computed decodes from now on (its last output is the next input)."""
    s = req.slot
    if req.status is Status.PREFILL:
      self.prefilling.remove(req)
    req.status = Status.RUNNING
    self.running[s], self.tok[s] = True, req.output_ids[-1]

  def release(self, req: Request) -> int:
    """Empty the request's slot; returns the KV tokens it had computed."""
    s = req.slot
    computed = req._computed = int(self.pos[s])
    if req.status is Status.PREFILL:
      self.prefilling.remove(req)
    self.order.remove(req)
    self.own_summaries -= req.summaries is not None
    self._empty(s)
    req.slot = None
    return computed

  def _empty(self, s: int) -> None:
    self.reqs[s] = None
    heapq.heappush(self._free, s)
    self.running[s] = False
    self.pos[s] = self.folded[s] = self.host[s] = 0
    self.sum_base[s], self.sum_counts[s] = -1, 0
    self.bt[s], self.ngroups[s], self.nruns[s] = 0, 0, 0

  def compact(self, limit: int) -> int:
    """Move every request in a slot >= limit into the lowest free slot (host state only: block
    tables hold physical ids, so the KV stays where it is). Needs at most `limit` occupied slots.
    Returns the requests moved."""
    moved = 0
    for req in self.order:
      if req.slot >= limit:
        src, dst = req.slot, heapq.heappop(self._free)
        assert dst < limit, f"{len(self.order)} occupied slots do not fit below {limit}"
        for name in ROW_ARRAYS:
          a = getattr(self, name)
          a[dst] = a[src]
        self.reqs[dst], req.slot = req, dst
        self._empty(src)
        moved += 1
    return moved

  # --------------------------------------------------------------------------- derived views

  def table_start(self, slots=slice(None)) -> np.ndarray:
    """Tokens of each slot's history that are not in its block table (folded + on the host)."""
    return self.folded[slots] + self.host[slots]

  def growth_need(self) -> int:
    """Blocks the running requests at a block boundary take in this step."""
    run = np.flatnonzero(self.running)
    return int(np.sum(self.pos[run] - self.table_start(run) >= self.cap[run]))

  def summary_slots(self) -> np.ndarray:
    """[S, Ks] flat pool slot of each used summary row (0 where unused)."""
    rows = self.sum_base[:, None] + np.arange(self.sum_counts.shape[1], dtype=np.int32)[None, :]
    return np.where(self.sum_counts > 0, rows, 0).astype(np.int32)

  def refresh(self, req: Request, runs: list[tuple[int, int, int]], grew: bool = False) -> None:
    """Update the slot's block table and groups from its pager runs (phys, logical, n).

    grew: the table only gained a block at its end (set one entry instead of rewriting the row).
    """
    s = req.slot
    p, l, k = runs[-1]
    n = len(runs)
    self.cap[s] = (l + k) * self.rt.block_size
    if grew:  # one block at the end: it extended the last run or began a new one
      self.bt[s, l + k - 1] = p + k - 1
      if n <= self.rt.max_groups and self.nruns[s] in (n, n - 1):  # the rows before it stand
        self.groups[s, n - 1] = p, l, k
        self.nruns[s] = self.ngroups[s] = n
        return
    else:
      self.bt[s] = 0
      for p, l, k in runs:
        self.bt[s, l:l + k] = np.arange(p, p + k)
    self.nruns[s] = n
    g = self.groups[s]
    if n <= self.rt.max_groups:
      g[:n] = runs
      g[n:] = 0
      self.ngroups[s] = n
    else:
      g[:] = 0
      self.ngroups[s] = 0
