"""The scheduler: admission, growth, preemption and the plan of one engine step (host only).

`schedule()` returns a `StepPlan` and touches no device array: it admits waiting requests into
free slots while the allocator can hold their prompts (first come, first served), gives each
running sequence at a block boundary its next block (preempting the newest request in a slot
when the pool runs dry: swapped to the host tier when there is room, otherwise recomputed later),
folds far history into summaries, and ends the allocator's round with its compaction moves.
After the device ran the step, `finish_prefill` / `finish_decode` account the sampled tokens.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections import deque
from typing import Iterable, Sequence

import numpy as np

from kvrm_jax.config import SAMPLER_WINDOW, RuntimeConfig
from kvrm_jax.sched import summaries as summaries_lib
from kvrm_jax.sched import tier as tier_lib
from kvrm_jax.sched.pager import BlockPager, OutOfBlocks
from kvrm_jax.sched.request import FEED_TOKEN, NON_FINITE, Request, RequestError, SamplingParams, Status
from kvrm_jax.sched.slots import Slots
from kvrm_jax.sched.static import StaticReservation
from kvrm_jax.sched.stats import EngineStats
from kvrm_jax.sched.summaries import SummaryConfig


@dataclasses.dataclass
class StepPlan:
  """What one engine step runs; built on the host, touches no device arrays."""

  prefill_rows: list[tuple[Request, int, int]]  # (request, start, n) chunks of prompt to compute
  decode: list[Request]  # requests in slots that decode one token
  moves: list[tuple[int, int]]  # block copies for the decode step (copy-on-write + compaction)
  preempted: list[Request]
  folds: list[tuple[int, int, float, float]] = dataclasses.field(default_factory=list)  # (src, dst, w_old, w_new)
  decode_slots: np.ndarray | None = None  # [len(decode)] int32 slots of `decode`, same order
  swaps: tuple[int, int] = (0, 0)  # host tier extents swapped out / in before this step


def check_sampling(rt: RuntimeConfig, vocab_size: int, sampling: SamplingParams) -> None:
  """Raise RequestError (with its `param`) for sampling settings this engine's compiled steps cannot
  honour: a top-k over the vocabulary or over the window sampler's 64, a temperature on a
  greedy-only engine. The scheduler checks every request; the server checks before queueing."""
  if sampling.top_k > vocab_size:
    raise RequestError(f"top_k={sampling.top_k} exceeds the vocabulary of {vocab_size}", param="top_k")
  if rt.sampler == "window" and sampling.top_k > SAMPLER_WINDOW:
    raise RequestError(f"top_k={sampling.top_k}: this engine's 'window' sampler keeps at most the {SAMPLER_WINDOW} "
                       f"most likely tokens (--sampler window); send top_k <= {SAMPLER_WINDOW}", param="top_k")
  if rt.greedy_only and sampling.temperature > 0:
    raise RequestError(f"temperature={sampling.temperature:g}: this engine samples greedily only "
                       "(--greedy-only); send temperature 0 or leave it out", param="temperature")


class Scheduler:
  """Requests, slots, the KV allocator (the pager, or the static baseline's reservation, with the
  same interface) and the host tier's bookkeeping of one engine."""

  def __init__(self, rt: RuntimeConfig, *, kind: str, vocab_size: int, max_position: int, eos_ids=(),
               tokenizer=None, summaries: SummaryConfig | None = None, tier_policy: str = "recency",
               swap_min_tokens: int = 0):
    if tier_policy not in tier_lib.POLICIES:
      raise ValueError(f"unknown tier policy {tier_policy!r}; choose one of {tier_lib.POLICIES}")
    self.rt, self.kind, self.tokenizer = rt, kind, tokenizer
    self.vocab_size, self.max_position, self.eos_ids = vocab_size, max_position, eos_ids
    # Host tier: placement policy, and swap preemption for requests of >= swap_min_tokens tokens.
    self.tier_policy, self.swap_min_tokens = tier_policy, swap_min_tokens
    self.tier = tier_lib.HostTier(rt) if rt.host_blocks else None
    # This round's host tier copies: (extent, device blocks, request id).
    self.swap_out: list[tuple[int, list[int], int]] = []
    self.swap_in: list[tuple[int, list[int], int]] = []
    if kind == "static":
      self.allocator = StaticReservation(rt.max_slots, rt.max_blocks_per_seq, rt.block_size)
    else:
      self.allocator = BlockPager(rt.num_blocks, rt.block_size, rt.max_blocks_per_seq,
                                  watermark_blocks=rt.watermark_blocks, enable_prefix_cache=rt.enable_prefix_cache)
    self.slots = Slots(rt)
    self.waiting: deque[Request] = deque()
    self.requests: dict[int, Request] = {}
    self.stats = EngineStats()
    self._next_id = 0
    self.summaries = summaries  # host-side policy; may be switched on or off between steps

  @property
  def summaries(self) -> SummaryConfig | None:
    return self._summaries

  @summaries.setter
  def summaries(self, sc: SummaryConfig | None) -> None:
    self._check_summaries(sc)
    self._summaries = sc

  def _check_summaries(self, sc: SummaryConfig | None) -> None:
    if sc is not None:
      if self.rt.host_blocks:
        raise ValueError("far-history summaries and the host tier cannot be combined")
      if self.kind == "static":
        raise ValueError("far-history summaries need the kvrm engine (the static baseline has no pager)")
      if sc.max_entries > self.rt.max_summaries:
        raise ValueError(f"summaries max={sc.max_entries} exceeds RuntimeConfig.max_summaries={self.rt.max_summaries}"
                         " (the decode step reads that many summary rows per sequence; 0 = built without them)")

  # --------------------------------------------------------------------------- requests

  def add(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, arrival: float | None = None,
          forced_output: Sequence[int] | None = None, summaries: SummaryConfig | None = None) -> int:
    """Queue a request (see Engine.add_request); raises RequestError if it can never be served."""
    sampling = sampling or SamplingParams()
    is_seq = isinstance(prompt_ids, Iterable) and not isinstance(prompt_ids, (str, bytes))
    ids = list(prompt_ids) if is_seq else []
    if not is_seq or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids):  # no int(1.5)
      raise RequestError(f"prompt_ids must be a sequence of integer token ids, got {prompt_ids!r:.80} "
                         "(text prompts go through generate() or the tokenizer)")
    ids = [int(t) for t in ids]
    check_sampling(self.rt, self.vocab_size, sampling)
    if not ids:
      raise RequestError("empty prompt")
    if any(t < 0 or t >= self.vocab_size for t in ids):
      raise RequestError(f"token ids must be in [0, {self.vocab_size})")
    limit = min(self.rt.max_seq_len, self.max_position)
    if len(ids) + sampling.max_new_tokens > limit:
      raise RequestError(f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                         f"context limit of {limit} tokens (model context {self.max_position}, runtime "
                         f"max_blocks_per_seq*block_size {self.rt.max_seq_len})")
    need = self.allocator.blocks_needed(len(ids) + sampling.max_new_tokens)
    if self.allocator.blocks_needed(len(ids)) > self.allocator.num_total_blocks or \
        need - self.rt.max_host_blocks_per_seq > self.allocator.num_total_blocks:
      raise RequestError(f"request needs {need} KV blocks; the pool has {self.allocator.num_total_blocks}")
    rid = self._next_id
    self._next_id += 1
    self._check_summaries(summaries)
    req = Request(rid, ids, sampling, arrival=time.perf_counter() if arrival is None else arrival, summaries=summaries)
    if forced_output is not None:
      if len(forced_output) < sampling.max_new_tokens:
        raise RequestError(f"forced_output has {len(forced_output)} tokens < max_new_tokens {sampling.max_new_tokens}")
      req.forced = [int(t) for t in forced_output]
    self.requests[rid] = req
    self.waiting.append(req)
    return rid

  def add_all(self, requests: Sequence[tuple[Sequence[int], SamplingParams]]) -> list[int]:
    """Queue (prompt ids, sampling) pairs, all or nothing: a bad one withdraws those queued before it."""
    rids = []
    try:
      for ids, sp in requests:
        rids.append(self.add(ids, sp))
    except Exception:
      for rid in rids:
        self.abort(rid)
        del self.requests[rid]
      raise
    return rids

  def abort(self, rid: int) -> bool:
    """Stop a request now (queued or running) and free its KV; False if it had already ended."""
    req = self.requests.get(rid)
    if req is None:
      raise RequestError(f"no request with id {rid!r}")
    if req.done:
      return False
    if req.slot is not None:
      self.release(req)
    else:
      self.waiting.remove(req)
      if self.tier is not None:
        self.tier.free(req.id)  # a swapped-out request's host blocks
    req.status, req.finish_reason, req.finish_time = Status.FINISHED, "aborted", time.perf_counter()
    return True

  def has_work(self) -> bool:
    return bool(self.waiting) or bool(self.slots.order)

  # --------------------------------------------------------------------------- slots

  def admit(self) -> None:
    """Move waiting requests into free slots while their prompts (or swapped KV) fit."""
    while self.waiting and self.slots.has_free:
      req = self.waiting[0]
      if req.swapped:
        if not tier_lib.swap_in(self, req):
          return
        continue
      # A resumed request keeps its pending last token out of the KV it recomputes.
      target = req.num_tokens - (1 if req.output_ids else 0)
      ids = req.all_ids[:target]
      if not self.allocator.can_allocate(ids):
        return  # FCFS: wait for blocks to free up
      self.waiting.popleft()
      cached = self.allocator.allocate(req.id, ids)
      self.stats.prefix_hit_blocks += cached // self.rt.block_size
      self.slots.bind(req, cached, Status.PREFILL)
      req.prefill_target = target
      req.admitted_time = req.admitted_time or time.perf_counter()
      self.refresh(req)

  def refresh(self, req: Request, grew: bool = False) -> None:
    """The slot's cached block table and groups, from the allocator's runs."""
    self.slots.refresh(req, self.allocator.runs(req.id), grew)

  def release(self, req: Request, keep_host: bool = False) -> None:
    """Free a request's slot and KV blocks (and its host blocks unless keep_host)."""
    self.allocator.free(req.id)
    if self.tier is not None and not keep_host:
      self.tier.free(req.id)
    req.mass = None
    if self.slots.sum_base[req.slot] >= 0:
      self.allocator.free(("sum", req.id))
    self.slots.release(req)

  def _preempt(self, victim: Request) -> None:
    """Preempt the victim and requeue it at the front; outputs are kept. With the host tier a
    running victim is swapped out (its KV copied to host extents) when there is room and budget;
    otherwise its KV is dropped and recomputed when it resumes."""
    victim.preemptions += 1
    self.stats.preemptions += 1
    if self.tier is not None and self.tier.untake(victim.id):
      # Swapped in this very round: cancel that copy; its KV is still in its host extents.
      self.swap_in = [e for e in self.swap_in if e[2] != victim.id]
      self.release(victim, keep_host=True)
      victim.status, victim.swapped = Status.WAITING, True
      self.stats.swap_preemptions += 1
    elif tier_lib.can_swap(self, victim):
      self.swap_out.extend((e, b, victim.id) for e, b in
                           self.tier.store(victim.id, self.allocator.block_table(victim.id), placed=False))
      self.release(victim, keep_host=True)
      victim.status, victim.swapped, victim.tiered = Status.WAITING, True, True
      self.stats.swap_preemptions += 1
    else:
      self.release(victim)
      victim.status, victim.num_computed = Status.WAITING, 0
    self.waiting.appendleft(victim)

  # --------------------------------------------------------------------------- the plan

  def compact_slots(self) -> int:
    """With RuntimeConfig.decode_buckets, move requests into the lowest free slots when a smaller
    decode row count (RuntimeConfig.rows_for) can then hold them all. Only with no step in flight
    (a step's plan names slots). Returns the requests moved."""
    sl, rt = self.slots, self.rt
    if not rt.decode_buckets or not sl.order:
      return 0
    target = rt.rows_for(len(sl.order))
    return sl.compact(target) if rt.rows_for(1 + max(r.slot for r in sl.order)) > target else 0

  def schedule(self) -> StepPlan:
    """Admit, pick prefill chunks, reserve KV for this step's decode tokens (preempting if dry)."""
    sl, bs = self.slots, self.rt.block_size
    if self.rt.max_host_reads:
      tier_lib.place_cold(self)
    self.admit()
    rows = self._prefill_rows()
    moves, preempted = [], []
    run = np.flatnonzero(sl.running)
    # Most sequences have room in their last block; only those at a block boundary touch the pager,
    # oldest admission first (when blocks run out the newest request in a slot is preempted).
    need = run[sl.pos[run] - sl.table_start(run) >= sl.cap[run]]
    for req in sorted((sl.reqs[i] for i in need), key=lambda r: (r.admitted_time, r.id)):
      while req.slot is not None:
        try:  # reserve the next whole block for the coming block_size tokens
          cow = self.allocator.append(req.id, int(sl.cap[req.slot]) + bs - self.allocator.num_tokens(req.id))
        except OutOfBlocks:
          victim = sl.order[-1]  # the newest request in a slot (or req itself)
          self._preempt(victim)
          preempted.append(victim)
          rows = [row for row in rows if row[0] is not victim]
          continue
        moves.extend(cow)
        self.refresh(req, grew=not cow)
        break
    if preempted:
      run = np.flatnonzero(sl.running)
    reqs = sl.reqs
    decode = [reqs[i] for i in run.tolist()]
    folds = summaries_lib.plan_folds(self, decode)
    # plan_compaction ends the pager's round (copies and moves of one step); call it every step.
    compaction = self.allocator.plan_compaction(self.rt.max_groups, max(0, self.rt.max_moves - len(moves)))
    if compaction:
      moves.extend(compaction)
      for r in sl.order:
        self.refresh(r)
    if len(moves) > max(self.rt.max_moves, 0):
      raise RuntimeError(f"{len(moves)} block copies exceed max_moves={self.rt.max_moves}")
    return StepPlan(rows, decode, moves, preempted, folds, run.astype(np.int32))

  def _prefill_rows(self) -> list[tuple[Request, int, int]]:
    """This step's prompt chunks (request, start, n), first admitted first. Split steps: up to
    max_prefill_seqs rows of at most the largest prefill bucket. Mixed steps: chunks filling up to
    max_tiles query tiles; a chunk ends on a tile boundary unless it ends its prompt."""
    sl, rt = self.slots, self.rt
    if not rt.step_tokens:
      biggest = rt.prefill_buckets[-1]
      return [(r, r.num_computed, min(biggest, r.prefill_target - r.num_computed))
              for r in sl.prefilling[:rt.max_prefill_seqs]]
    rows, tiles = [], rt.max_tiles
    for r in sl.prefilling:
      if tiles == 0:
        break
      n = min(r.prefill_target - r.num_computed, tiles * rt.tile)
      rows.append((r, r.num_computed, n))
      tiles -= -(-n // rt.tile)
    return rows

  def take_swaps(self) -> tuple[list, list]:
    """This round's host tier copies (swap-outs, swap-ins), handed to the device once."""
    outs, ins = self.swap_out, self.swap_in
    self.swap_out, self.swap_in = [], []
    self.stats.swap_out_extents += len(outs)
    self.stats.swap_in_extents += len(ins)
    return outs, ins

  # --------------------------------------------------------------------------- postprocess

  def finish_prefill(self, plan: StepPlan, tokens: np.ndarray, logits, now: float, events: dict) -> dict:
    """Account a prefill step: prompts that completed emit their first token ([P] by row).
    Returns {request id: logits row} of the emitted first tokens (with logits)."""
    out = {}
    for i, (req, start, n) in enumerate(plan.prefill_rows):
      req.num_computed = start + n
      if req.num_computed == req.prefill_target:
        self.allocator.commit_tokens(req.id, req.all_ids[:req.num_computed])
        self.slots.prefilling.remove(req)
        req.status = Status.RUNNING
        if len(req.output_ids) == 0:  # fresh request: its first token; a resumed one keeps its own
          if logits is not None:
            out[req.id] = logits[i]
          self._emit(req, tokens[i], now, events)
        if req.slot is not None:  # not finished by its first token
          self.slots.mark_running(req)
    return out

  def finish_decode(self, plan: StepPlan, tokens: np.ndarray, now: float, events: dict, mass=None) -> None:
    """Account a decode step's sampled tokens ([S] by slot): positions advance, tokens are emitted.
    mass: [S, MB] attention mass per table block (the attention placement policy)."""
    sl, bs = self.slots, self.rt.block_size
    slots = plan.decode_slots
    if mass is not None:
      tier_lib.update_mass(self, plan.decode, mass)
    sl.pos[slots] += 1
    sl.tok[slots] = tokens[slots]  # forced tokens (teacher forcing) are set again in _emit
    for req in plan.decode:
      s = req.slot
      if sl.pos[s] % bs == 0 and not sl.folded[s] and not req.tiered:
        self.allocator.commit_tokens(req.id, req.all_ids[:req.num_computed])
      self._emit(req, tokens[s], now, events)

  # --------------------------------------------------------------------------- pipelined decode

  def pipelinable(self) -> bool:
    """Whether the next step can be planned before the tokens of the step in flight are known: only
    running sequences (no prompt work, no admission possible), none teacher-forced, no host tier
    or summaries, and free blocks for every sequence at a block boundary (no preemption)."""
    sl = self.slots
    if not sl.order or sl.prefilling or (self.waiting and sl.has_free) or self.tier is not None:
      return False
    if self.summaries is not None or any(r.forced is not None or r.summaries is not None for r in sl.order):
      return False
    run = np.flatnonzero(sl.running)
    need = int(np.sum(sl.pos[run] - sl.table_start(run) >= sl.cap[run]))
    return self.allocator.num_free_blocks >= 2 * need + self.rt.watermark_blocks  # copy-on-write may take one more

  def advance(self, plan: StepPlan) -> np.ndarray:
    """A decode step was dispatched whose tokens are not read yet: its rows' positions advance now
    and their next input is the step's output on the device (FEED_TOKEN). Returns the rows'
    positions after the step (for land_decode)."""
    sl, slots = self.slots, plan.decode_slots
    sl.pos[slots] += 1
    sl.tok[slots] = FEED_TOKEN
    return sl.pos[slots].copy()

  def land_decode(self, plan: StepPlan, pos_after: np.ndarray, tokens: np.ndarray, now: float, events: dict,
                  latest: bool) -> None:
    """Account the tokens ([S] by slot) of a decode step dispatched ahead (`advance`). A row whose
    request ended meanwhile (EOS or a stop string at the step before, an abort) is dropped: at most
    one token of work wasted. latest: no later step is in flight (the slots take the tokens as
    their next inputs)."""
    sl, bs = self.slots, self.rt.block_size
    for req, s, p in zip(plan.decode, plan.decode_slots, pos_after):
      if req.done or req.slot != s:
        continue
      if latest:
        sl.tok[s] = tokens[s]
      if p % bs == 0 and not sl.folded[s] and not req.tiered:
        self.allocator.commit_tokens(req.id, req.all_ids[:p])
      self._emit(req, tokens[s], now, events)

  def _emit(self, req: Request, token: int, now: float, events: dict) -> None:
    if token == NON_FINITE:  # its logits were NaN/inf: end it rather than emit garbage
      return self._finish(req, "error", now)
    if req.forced is not None:
      token = req.forced[len(req.output_ids)]
      if req.slot is not None:
        self.slots.tok[req.slot] = token
    req.output_ids.append(int(token))
    req.token_times.append(now)
    if req.first_token_time is None:
      req.first_token_time = now
    if self.stats.first_token_s is None and self.stats._t_first_step is not None:
      self.stats.first_token_s = now - self.stats._t_first_step
    events.setdefault(req.id, []).append(int(token))
    sp = req.sampling
    reason = None
    if not sp.ignore_eos and int(token) in self.eos_ids:
      reason = "eos"
    elif len(req.output_ids) >= sp.max_new_tokens:
      reason = "length"
    elif sp.stop and self.tokenizer is not None:
      tail = self.tokenizer.decode(req.output_ids[-32:])
      if any(s in tail for s in sp.stop):
        reason = "stop"
    if reason:
      self._finish(req, reason, now)

  def _finish(self, req: Request, reason: str, now: float) -> None:
    req.status, req.finish_reason, req.finish_time = Status.FINISHED, reason, now
    if req.slot is not None:
      self.release(req)

  def record_memory(self, plan: StepPlan) -> None:
    """Per decode step: reserved blocks, live tokens, groups per sequence, host tier use."""
    sl, st = self.slots, self.stats
    reserved = self.allocator.num_used_blocks
    if self.tier is not None:
      host_reads = tier_lib.staged_extents(self, plan.decode)
      st.tier_series.append((*plan.swaps, host_reads, self.tier.num_used_blocks))
    occupied = np.fromiter((r.slot for r in sl.order), np.int64, len(sl.order))
    live = int(np.sum(sl.pos[occupied] - sl.table_start(occupied))) + len(plan.decode)
    st.reserved_series.append(reserved)
    st.live_series.append(live)
    st.peak_reserved_blocks = max(st.peak_reserved_blocks, reserved)
    st.peak_live_tokens = max(st.peak_live_tokens, live)
    if plan.decode:
      st.groups_per_seq.append(float(np.mean(sl.nruns[[r.slot for r in plan.decode]])))
