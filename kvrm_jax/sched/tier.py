"""Heterogeneous memory tier, host side: the extent allocator of the pinned-host pool, each
request's host-resident blocks, and the placement policies (numpy only; the device side is
kvrm_jax/step/tier.py).

Every logical block of a request lives on one tier. Host blocks are handed out in *extents* of
`host_extent` consecutive host blocks; an extent belongs to one request and is the unit of
transfer, so blocks cross the host<->device link as a few large copies instead of block by block
(`host_extent=1` is the block-by-block baseline). Two paths use the tier:

* placement: a running request whose blocks no longer fit the device pool keeps cold full blocks
  (chosen by a `policy`) on the host; the decode step stages its host extents layer by layer
  (one host->device copy per extent and layer) and attends to them exactly, merging the partial
  softmax statistics with the device part's (no approximation);
* swap: preemption moves a running request's blocks to the host (one device->host copy per
  extent) and back when it resumes, instead of recomputing its prompt and outputs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.sched.request import Status

POLICIES = ("recency", "attention")


class OutOfHostBlocks(Exception):
  """The host tier has no free extent."""


@dataclasses.dataclass
class HostRecord:
  """A request's host-resident blocks. blocks[i] = extent * host_extent + offset."""

  extents: list[int] = dataclasses.field(default_factory=list)
  blocks: list[int] = dataclasses.field(default_factory=list)
  placed: int = 0  # leading entries of `blocks` kept there by placement (the rest: swapped out)
  placed_extents: int = 0  # leading entries of `extents` holding those


class HostTier:
  """Extent allocator of the host pool and the host-resident blocks of each request.

  Extents freed in a round (by a swap-in that has not run yet) are held until `end_round()`, so a
  swap-out planned in the same round cannot overwrite them before they are read.
  """

  def __init__(self, rt: RuntimeConfig):
    self.extent = rt.host_extent
    self.num_extents = rt.host_extents
    self._free = list(range(self.num_extents - 1, 0, -1))  # extent 0 is the null extent
    self._held: list[int] = []
    self._taken: dict[int, tuple[list[int], list[int]]] = {}  # this round's take()s
    self.records: dict[int, HostRecord] = {}

  @property
  def num_free_extents(self) -> int:
    return len(self._free)

  @property
  def num_used_blocks(self) -> int:
    return sum(len(r.blocks) for r in self.records.values())

  @property
  def num_used_extents(self) -> int:
    return self.num_extents - 1 - len(self._free)

  def record(self, rid: int) -> HostRecord:
    return self.records.setdefault(rid, HostRecord())

  def extents_for(self, num_blocks: int) -> int:
    return -(-num_blocks // self.extent)

  def store(self, rid: int, device_blocks: list[int], placed: bool) -> list[tuple[int, list[int]]]:
    """Give the blocks fresh extents; returns the swap-out list [(extent, device blocks)]."""
    n = self.extents_for(len(device_blocks))
    if n > len(self._free):
      raise OutOfHostBlocks(f"{n} extents needed, {len(self._free)} free")
    rec = self.record(rid)
    if placed and len(rec.blocks) > rec.placed:
      raise ValueError("placement of a request whose blocks are swapped out")
    out = []
    for i in range(n):
      ext = self._free.pop()
      chunk = device_blocks[i * self.extent:(i + 1) * self.extent]
      rec.extents.append(ext)
      rec.blocks.extend(ext * self.extent + j for j in range(len(chunk)))
      out.append((ext, list(chunk)))
    if placed:
      rec.placed, rec.placed_extents = len(rec.blocks), len(rec.extents)
    return out

  def placed(self, rid: int) -> tuple[list[int], list[int]]:
    """(extents, blocks) a running request keeps on the host by placement."""
    rec = self.records.get(rid)
    if rec is None:
      return [], []
    return rec.extents[:rec.placed_extents], rec.blocks[:rec.placed]

  def swapped_extents(self, rid: int) -> int:
    rec = self.records.get(rid)
    return 0 if rec is None else len(rec.extents) - rec.placed_extents

  def take(self, rid: int) -> tuple[list[int], list[int]]:
    """Swap-in of a request's swapped-out blocks: (their extents, their host blocks in order).

    Blocks it keeps on the host by placement stay there (and in its record). The taken extents
    are freed at the end of the round (after the swap that reads them), unless `untake` puts
    them back first (the request was preempted again in the same round)."""
    rec = self.records.get(rid)
    if rec is None:
      return [], []
    exts, blocks = rec.extents[rec.placed_extents:], rec.blocks[rec.placed:]
    self._taken[rid] = (exts, blocks)
    del rec.extents[rec.placed_extents:], rec.blocks[rec.placed:]
    if not rec.extents:
      del self.records[rid]
    self._held.extend(exts)
    return exts, blocks

  def untake(self, rid: int) -> bool:
    """Cancel this round's take(rid): its swapped-out blocks are on the host again, untouched."""
    taken = self._taken.pop(rid, None)
    if taken is None:
      return False
    exts, blocks = taken
    rec = self.record(rid)
    rec.extents.extend(exts)
    rec.blocks.extend(blocks)
    held = set(exts)
    self._held = [e for e in self._held if e not in held]
    return True

  def free(self, rid: int) -> None:
    """Drop a request's host blocks now (it finished or is recomputed: nothing will read them)."""
    rec = self.records.pop(rid, None)
    if rec is not None:
      self._free.extend(rec.extents)

  def end_round(self) -> None:
    self._free.extend(self._held)
    self._held.clear()
    self._taken.clear()

  def check_invariants(self) -> None:
    owned = [e for r in self.records.values() for e in r.extents]
    alls = owned + self._free + self._held
    assert sorted(alls) == list(range(1, self.num_extents)), "extent leaked or double-owned"
    for r in self.records.values():
      assert 0 <= r.placed <= len(r.blocks)
      assert {b // self.extent for b in r.blocks} <= set(r.extents)


def pick_blocks(policy: str, candidates: np.ndarray, mass: np.ndarray | None, n: int) -> np.ndarray:
  """Table indices of the n blocks to place on the host among `candidates` (full, non-tail).

  recency: the oldest (lowest logical index); attention: the least accumulated attention mass
  (ties to the oldest).
  """
  if policy == "recency" or mass is None:
    return np.sort(candidates)[:n]
  order = np.lexsort((candidates, mass[candidates]))
  return np.sort(candidates[order[:n]])


def placement_bound(kv_bytes: float, hbm_bytes: float, hbm_bw: float, host_bw: float) -> dict:
  """Upper bound on the aggregate KV read bandwidth of one decode step over two tiers.

  Following the placement formulation of arXiv 2508.13231 (its static, migration-free form):
  a step reads kv_bytes; x of them from HBM (x <= hbm_bytes, the capacity the KV may use there)
  and kv_bytes - x from host memory, both tiers streaming concurrently, so the step's KV time is
  max(x / hbm_bw, (kv_bytes - x) / host_bw). It is smallest at the bandwidth-proportional split
  x* = kv_bytes * hbm_bw / (hbm_bw + host_bw), clipped to the capacity. Returns x*, the minimal
  time and the bound kv_bytes / t* (bytes/s).
  """
  x = min(hbm_bytes, kv_bytes * hbm_bw / (hbm_bw + host_bw), kv_bytes)
  t = max(x / hbm_bw, (kv_bytes - x) / host_bw)
  return {"hbm_bytes": x, "host_bytes": kv_bytes - x, "time_s": t,
          "bandwidth": kv_bytes / t if t > 0 else math.inf}


# ----------------------------------------------------------------------------- scheduling with the tier
# These run inside Scheduler.schedule() / finish_decode(); `sched` is the Scheduler (kvrm_jax/sched/
# scheduler.py), whose slots, allocator and host tier they update.


def staged_extents(sched, reqs) -> int:
  """Host extents the decode step stages for these requests (in slots): their placed extents."""
  return sum(len(sched.tier.placed(r.id)[0]) for r in reqs if sched.slots.host[r.slot])


def can_swap(sched, req) -> bool:
  """Whether preempting `req` may swap its KV out (room and this round's budget) instead of dropping it."""
  if sched.tier is None or req.status is not Status.RUNNING or req.num_computed < max(1, sched.swap_min_tokens):
    return False
  n = sched.tier.extents_for(len(sched.allocator.block_table(req.id)))
  return n <= sched.tier.num_free_extents and len(sched.swap_out) + n <= sched.rt.max_swap_extents


def swap_in(sched, req) -> bool:
  """Resume a swapped-out request: fresh device blocks, its swapped extents copied back this
  step. Blocks it had placed on the host stay there (the step keeps staging them)."""
  rt, tier, sl = sched.rt, sched.tier, sched.slots
  placed_ext, placed = tier.placed(req.id)
  host_tokens = len(placed) * rt.block_size
  n = sched.allocator.blocks_needed(req.num_computed - host_tokens)
  reads = staged_extents(sched, sl.order)
  if (sched.allocator.num_free_blocks - n - sl.growth_need() < rt.watermark_blocks
      or len(sched.swap_in) + tier.swapped_extents(req.id) > rt.max_swap_extents
      or (placed_ext and reads + len(placed_ext) > rt.max_host_reads)):
    return False  # FCFS: wait for blocks (or for the next step's swap / read budget)
  sched.waiting.popleft()
  table = sched.allocator.allocate_blank(req.id, req.num_computed - host_tokens)
  extents, blocks = tier.take(req.id)
  r = tier.extent
  dst = {e: [0] * r for e in extents}
  for hb, b in zip(blocks, table):
    dst[hb // r][hb % r] = b
  sched.swap_in.extend((e, dst[e], req.id) for e in extents)
  req.swapped, req.mass = False, None
  s = sl.bind(req, req.num_computed, req.status)
  sl.host[s] = host_tokens
  req.prefill_target = req.num_computed
  sched.refresh(req)
  sl.mark_running(req)
  return True


def place_cold(sched) -> None:
  """Placement: when this step's growth and the next admission need more blocks than are free,
  move cold full blocks of running requests to host extents (the policy picks which), at most
  max_swap_extents extents per step and within the step's host read budget."""
  rt, tier, sl = sched.rt, sched.tier, sched.slots
  bs, r = rt.block_size, tier.extent
  run = np.flatnonzero(sl.running)
  need = sl.growth_need()
  if sched.waiting and sl.has_free and not sched.waiting[0].swapped:
    need += sched.allocator.blocks_needed(sched.waiting[0].num_tokens)
  deficit = need + rt.watermark_blocks - sched.allocator.num_free_blocks
  reads = staged_extents(sched, (sl.reqs[i] for i in run))
  while deficit > 0 and len(sched.swap_out) < rt.max_swap_extents and reads < rt.max_host_reads \
      and tier.num_free_extents:
    best, cands = None, None
    for i in run:  # the running request with the most device blocks and room on the host
      req = sl.reqs[i]
      if req is None or req.status is not Status.RUNNING:
        continue
      nt = len(sched.allocator.block_table(req.id))
      room = rt.max_host_blocks_per_seq - int(sl.host[i]) // bs
      if nt > 1 and room > 0 and (best is None or nt > len(cands) + 1):
        best, cands = req, np.arange(nt - 1)
    if best is None:
      return
    s = best.slot
    room = rt.max_host_blocks_per_seq - int(sl.host[s]) // bs
    idx = pick_blocks(sched.tier_policy, cands, best.mass, min(r, room, len(cands)))
    table = sched.allocator.block_table(best.id)
    sched.swap_out.extend((e, b, best.id) for e, b in tier.store(best.id, [table[i] for i in idx], placed=True))
    for i in idx[::-1]:
      sched.allocator.drop_blocks(best.id, int(i), 1)
    if best.mass is not None:
      best.mass = np.delete(best.mass, idx)
    sl.host[s] += len(idx) * bs
    best.tiered = True
    sched.refresh(best)
    deficit -= len(idx)
    reads += 1
    sched.stats.placed_blocks += len(idx)


def update_mass(sched, decode, mass: np.ndarray) -> None:
  """Attention policy: exponential moving average of each table block's attention mass.
  mass: [S, MB] this step's mass per table block."""
  sl, bs = sched.slots, sched.rt.block_size
  for req in decode:
    s = req.slot
    n = (int(sl.pos[s]) - int(sl.table_start(s))) // bs + 1  # table blocks read
    m = mass[s, :n]
    if req.mass is None or len(req.mass) > n:
      req.mass = m.copy()
    else:
      old = req.mass
      req.mass = m.copy()
      req.mass[:len(old)] = 0.8 * old + 0.2 * m[:len(old)]
