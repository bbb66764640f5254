"""Continuous-batching engine: schedule -> run the compiled steps -> postprocess.

    engine = Engine.from_checkpoint(path, RuntimeConfig(...))
    outs = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=16))

or streaming: `engine.add_request(ids, sampling)` then `engine.step()` until `engine.has_work()`
is False; each step returns the requests' new tokens. The compiled decode step is
`engine.decode_step(state, k_pool, v_pool, ints, floats)` with the descriptor built by
`engine.build_decode_descriptor(plan)` (see docs/notebook.md).
"""

from __future__ import annotations

import dataclasses
import heapq
import numbers
import time
from collections import deque
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax import descriptor as desc_lib
from kvrm_jax import model as model_lib
from kvrm_jax import step as step_lib
from kvrm_jax import tier as tier_lib
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.pager import BlockPager, OutOfBlocks
from kvrm_jax.sequence import Request, RequestOutput, SamplingParams, Status
from kvrm_jax.static import StaticReservation, static_runtime
from kvrm_jax.summaries import SummaryConfig, fold_targets


def _host(x) -> np.ndarray:
  """A replicated output to host; across processes (multi-host) each reads its local copy."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _put_block_ops(d, moves, folds) -> None:
  """Write block copies and summary folds into a descriptor's padded lists."""
  if moves:
    d["moves"][:len(moves)] = moves
  if folds:
    f = np.asarray(folds, np.float64)
    d["folds"][:len(folds)] = f[:, :2].astype(np.int32)
    d["fold_w"][:len(folds)] = f[:, 2:]


class RequestError(ValueError):
  """A request that can never be served (a user error: empty, too long, ...)."""


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


@dataclasses.dataclass
class EngineStats:
  decode_steps: int = 0
  prefill_steps: int = 0
  preemptions: int = 0
  prefix_hit_blocks: int = 0
  moves: int = 0
  folds: int = 0
  peak_reserved_blocks: int = 0
  peak_live_tokens: int = 0
  groups_per_seq: list[float] = dataclasses.field(default_factory=list)
  host_us: list[float] = dataclasses.field(default_factory=list)
  step_s: list[float] = dataclasses.field(default_factory=list)
  reserved_series: list[int] = dataclasses.field(default_factory=list)
  live_series: list[int] = dataclasses.field(default_factory=list)
  # Host tier: blocks placed on the host, swap preemptions, extents copied out / in, and per decode
  # step (extents swapped out, in, staged by the step per layer; host blocks in use).
  placed_blocks: int = 0
  swap_preemptions: int = 0
  swap_out_extents: int = 0
  swap_in_extents: int = 0
  tier_series: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)
  # Start-up: Engine() seconds; seconds of the steps that traced and compiled (their first run
  # included); first step() call to first token (compiles included).
  build_s: float = 0.0
  compile_s: float = 0.0
  first_token_s: float | None = None
  _t_first_step: float | None = None


class Engine:
  """KV-RM engine (`kind="kvrm"`) or the static-graph baseline (`kind="static"`)."""

  def __init__(self, cfg: ModelConfig, model: model_lib.Llama, rt: RuntimeConfig, *, tokenizer=None,
               kind: str = "kvrm", with_logits: bool = False, mesh=None, summaries: SummaryConfig | None = None,
               tier_policy: str = "recency", swap_min_tokens: int = 0):
    t_build = time.perf_counter()
    if kind not in ("kvrm", "static"):
      raise ValueError(f"unknown engine kind {kind!r} (kvrm | static)")
    if rt.host_blocks and kind == "static":
      raise ValueError("the host tier (RuntimeConfig.host_blocks) needs the kvrm engine")
    if tier_policy not in tier_lib.POLICIES:
      raise ValueError(f"unknown tier policy {tier_policy!r}; choose one of {tier_lib.POLICIES}")
    if kind == "static":
      rt = static_runtime(rt)
    self.rt, self.kind, self.tokenizer, self.mesh = rt, kind, tokenizer, mesh
    self.graphdef, self.state = model_lib.split(model)
    # The engine computes in its runtime dtype, whatever the model was built in: the KV pool holds
    # rt.dtype, and the attention kernels take q, k and v of one dtype.
    dt = jnp.dtype(rt.dtype)
    self.state = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, self.state)
    specs, pool_sharding, self._desc_sharding = None, None, None
    if mesh is not None:
      from jax.sharding import NamedSharding

      from kvrm_jax import sharding
      padded = sharding.padded_config(cfg, mesh.size)
      if padded != cfg:
        from flax import nnx
        w = sharding.pad_weights(cfg, padded, nnx.to_pure_dict(self.state))
        self.graphdef, self.state = model_lib.split(model_lib.abstract_model(padded, w["wqkv"].dtype))
        nnx.replace_by_pure_dict(self.state, w)
        cfg = padded
      specs = sharding.state_specs(self.state)
      self.state = sharding.place_state(self.state, mesh)
      pool_sharding = NamedSharding(mesh, sharding.POOL_SPEC)
      self._desc_sharding = NamedSharding(mesh, sharding.REPLICATED)
    self.cfg = cfg
    self.k_pool, self.v_pool = step_lib.init_pools(cfg, rt, sharding=pool_sharding)
    # Host tier: placement policy, and swap preemption for requests of >= swap_min_tokens tokens.
    self.tier_policy, self.swap_min_tokens = tier_policy, swap_min_tokens
    self.with_mass = bool(rt.max_host_reads) and tier_policy == "attention"
    self.decode_step, self._prefill_step, self.compiles = step_lib.build_steps(
        self.graphdef, cfg, rt, with_logits=with_logits, mesh=mesh, state_specs=specs, with_mass=self.with_mass)
    self._executables: dict = {}  # ("decode",) / ("prefill", chunk) -> the step's AOT executable
    self.tier = None
    # This round's host tier copies: (extent, device blocks, request id).
    self._swap_out: list[tuple[int, list[int], int]] = []
    self._swap_in: list[tuple[int, list[int], int]] = []
    if rt.host_blocks:
      self.tier = tier_lib.HostTier(rt)
      self.k_host, self.v_host = tier_lib.init_host_pools(cfg, rt, mesh)
      self.swap_step = step_lib.build_swap(rt, mesh, tuple(x.sharding for x in (
          self.k_pool, self.v_pool, self.k_host, self.v_host)))
      self._swap_layout = tier_lib.swap_layout(rt)
    self.with_logits = with_logits
    if kind == "static":
      self.allocator = StaticReservation(rt.max_slots, rt.max_blocks_per_seq, rt.block_size)
    else:
      self.allocator = BlockPager(rt.num_blocks, rt.block_size, rt.max_blocks_per_seq,
                                  watermark_blocks=rt.watermark_blocks, enable_prefix_cache=rt.enable_prefix_cache)
    self.dlayout = desc_lib.decode_layout(rt)
    self.waiting: deque[Request] = deque()
    self.slots: list[Request | None] = [None] * rt.max_slots
    self.requests: dict[int, Request] = {}
    self.stats = EngineStats()
    if self.tier is not None:
      self._run_swaps()  # compile the swap op now (it copies nothing), not at the first preemption
    self.last_logits = None  # with_logits: {request id: [V] logits of its latest sampled token}
    self._next_id = 0
    self._poison = None
    self.stats.build_s = time.perf_counter() - t_build
    self._bt = np.zeros((rt.max_slots, rt.max_blocks_per_seq), np.int32)  # [S, MB] cached block tables
    self._groups = np.zeros((rt.max_slots, rt.max_groups, 3), np.int32)  # [S, G, 3]
    self._ngroups = np.zeros((rt.max_slots,), np.int32)  # [S]
    self._nruns = np.zeros((rt.max_slots,), np.int32)  # [S] runs per sequence (may exceed G)
    # Per-slot sampling parameters, set at admission: [S] each.
    self._temp = np.zeros((rt.max_slots,), np.float32)
    self._topp = np.ones((rt.max_slots,), np.float32)
    self._topk = np.zeros((rt.max_slots,), np.int32)
    self._seed = np.zeros((rt.max_slots,), np.int32)
    self._kvoff = np.zeros((rt.max_slots,), np.int32)  # [S] folded tokens per slot
    # Mirrors of the running requests' host state, so a step's bookkeeping is vectorized: [S] each.
    self._running = np.zeros((rt.max_slots,), bool)  # slot holds a RUNNING request
    self._pos = np.zeros((rt.max_slots,), np.int32)  # its num_computed (= position of its next input)
    self._tok = np.zeros((rt.max_slots,), np.int32)  # its next input token (last output)
    self._cap = np.zeros((rt.max_slots,), np.int32)  # its capacity (tokens its table holds)
    self._prefilling: list[Request] = []  # PREFILL requests, oldest admission first
    ks = max(rt.max_summaries, 1)
    self._sum_slots = np.zeros((rt.max_slots, ks), np.int32)  # [S, Ks] flat slots of summary rows
    self._sum_counts = np.zeros((rt.max_slots, ks), np.float32)  # [S, Ks] tokens per row; 0 = unused
    self.summaries = summaries  # host-side policy; may be switched on or off between steps
    self._free_slots = list(range(rt.max_slots))  # heap: lowest free slot first
    self._order: list[Request] = []  # requests in slots, oldest admission first

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

  @classmethod
  def from_checkpoint(cls, path, rt: RuntimeConfig, **kw) -> "Engine":
    from kvrm_jax.checkpoint import load_checkpoint
    cfg, model, tok = load_checkpoint(path, rt.dtype)
    return cls(cfg, model, rt, tokenizer=tok, **kw)

  # --------------------------------------------------------------------------- requests

  def add_request(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                  arrival: float | None = None, forced_output: Sequence[int] | None = None,
                  summaries: SummaryConfig | None = None) -> int:
    """Queue a request; raises RequestError if it can never be served.

    forced_output: teacher forcing: emit these tokens instead of sampled ones (the step still
    computes logits for them; evaluation and trace replay use this).
    summaries: this request's far-history summary policy (default: the engine's `summaries`).
    """
    sampling = sampling or SamplingParams()
    ids = list(prompt_ids) if not isinstance(prompt_ids, (str, bytes)) and isinstance(prompt_ids, Iterable) else [""]
    if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in ids):  # no silent int(1.5) or int(True)
      raise RequestError(f"prompt_ids must be a sequence of integer token ids, got {prompt_ids!r:.80} "
                         "(text prompts go through generate() or the tokenizer)")
    ids = [int(t) for t in ids]
    if sampling.top_k > self.cfg.vocab_size:
      raise RequestError(f"top_k={sampling.top_k} exceeds the vocabulary of {self.cfg.vocab_size}")
    if not ids:
      raise RequestError("empty prompt")
    if any(t < 0 or t >= self.cfg.vocab_size for t in ids):
      raise RequestError(f"token ids must be in [0, {self.cfg.vocab_size})")
    limit = min(self.rt.max_seq_len, self.cfg.max_position)
    if len(ids) + sampling.max_new_tokens > limit:
      raise RequestError(f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                         f"context limit of {limit} tokens (model context {self.cfg.max_position}, runtime "
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

  def abort(self, rid: int) -> bool:
    """Stop a request now (queued or running) and free its KV; False if it had already ended."""
    req = self.requests.get(rid)
    if req is None:
      raise RequestError(f"no request with id {rid!r}")
    if req.done:
      return False
    if req.slot is not None:
      self._release_slot(req)
    else:
      self.waiting.remove(req)
      if self.tier is not None:
        self.tier.free(req.id)  # a swapped-out request's host blocks
    req.status, req.finish_reason, req.finish_time = Status.FINISHED, "aborted", time.perf_counter()
    return True

  def has_work(self) -> bool:
    return bool(self.waiting) or bool(self._order)

  # --------------------------------------------------------------------------- schedule

  def _admit(self) -> None:
    while self.waiting and self._free_slots:
      slot = self._free_slots[0]
      req = self.waiting[0]
      if req.swapped:
        if not self._swap_in_request(req, slot):
          return
        continue
      # A resumed request keeps its pending last token out of the KV it recomputes.
      target = req.num_tokens - (1 if req.output_ids else 0)
      ids = req.all_ids[:target]
      if not self.allocator.can_allocate(ids):
        return  # FCFS: wait for blocks to free up
      self.waiting.popleft()
      heapq.heappop(self._free_slots)
      if self.kind == "static":
        cached = self.allocator.allocate(req.id, ids, slot)
      else:
        cached = self.allocator.allocate(req.id, ids)
      self.stats.prefix_hit_blocks += cached // self.rt.block_size
      req.slot, req.status, req.num_computed, req.prefill_target = slot, Status.PREFILL, cached, target
      req.admitted_time = req.admitted_time or time.perf_counter()
      self.slots[slot] = req
      self._order.append(req)
      self._prefilling.append(req)
      sp = req.sampling
      self._temp[slot], self._topp[slot], self._topk[slot], self._seed[slot] = (
          sp.temperature, sp.top_p, sp.top_k, sp.seed)
      self._refresh_tables(req)

  def _staged_extents(self, reqs) -> int:
    """Host extents the decode step stages for these requests: their placed extents."""
    return sum(len(self.tier.placed(r.id)[0]) for r in reqs if r.host_tokens)

  def _growth_need(self) -> int:
    """Blocks the running requests at a block boundary take in this step."""
    run = np.flatnonzero(self._running)
    return int(np.sum(self._pos[run] - self._kvoff[run] >= self._cap[run]))

  def _swap_in_request(self, req: Request, slot: int) -> bool:
    """Resume a swapped-out request: fresh device blocks, its swapped extents copied back this
    step. Blocks it had placed on the host stay there (the step keeps staging them)."""
    bs = self.rt.block_size
    placed_ext, placed = self.tier.placed(req.id)
    host_tokens = len(placed) * bs
    n = self.allocator.blocks_needed(req.num_computed - host_tokens)
    reads = self._staged_extents(self._order)
    if (self.allocator.num_free_blocks - n - self._growth_need() < self.rt.watermark_blocks
        or len(self._swap_in) + self.tier.swapped_extents(req.id) > self.rt.max_swap_extents
        or (placed_ext and reads + len(placed_ext) > self.rt.max_host_reads)):
      return False  # FCFS: wait for blocks (or for the next step's swap / read budget)
    self.waiting.popleft()
    heapq.heappop(self._free_slots)
    table = self.allocator.allocate_blank(req.id, req.num_computed - host_tokens)
    extents, blocks = self.tier.take(req.id)
    r = self.tier.extent
    dst = {e: [0] * r for e in extents}
    for hb, b in zip(blocks, table):
      dst[hb // r][hb % r] = b
    self._swap_in.extend((e, dst[e], req.id) for e in extents)
    req.swapped, req.host_tokens, req.mass = False, host_tokens, None
    self._kvoff[slot] = req.kv_offset + host_tokens
    req.slot, req.prefill_target = slot, req.num_computed
    self.slots[slot] = req
    self._order.append(req)
    sp = req.sampling
    self._temp[slot], self._topp[slot], self._topk[slot], self._seed[slot] = (
        sp.temperature, sp.top_p, sp.top_k, sp.seed)
    self._refresh_tables(req)
    self.mark_running(req)
    return True

  def mark_running(self, req: Request) -> None:
    """A request in a slot whose prompt KV is computed decodes from now on (its last output token
    is the next input)."""
    s = req.slot
    if req.status is Status.PREFILL:
      self._prefilling.remove(req)
    req.status = Status.RUNNING
    self._running[s], self._pos[s], self._tok[s], self._cap[s] = True, req.num_computed, req.output_ids[-1], req.capacity

  def _release_slot(self, req: Request, keep_host: bool = False) -> None:
    s = req.slot
    self.allocator.free(req.id)
    if self.tier is not None and not keep_host:
      self.tier.free(req.id)
    req.host_tokens, req.mass = 0, None
    if req.sum_base is not None:
      self.allocator.free(("sum", req.id))
    req.kv_offset, req.sum_base, req.sum_counts = 0, None, []
    self._kvoff[s], self._sum_slots[s], self._sum_counts[s], self._running[s] = 0, 0, 0, False
    if req.status is Status.PREFILL:
      self._prefilling.remove(req)
    self.slots[s] = None
    self._order.remove(req)
    heapq.heappush(self._free_slots, s)
    self._bt[s], self._ngroups[s], self._nruns[s] = 0, 0, 0
    req.slot = None

  def _preempt(self, victim: Request) -> None:
    """Preempt the victim and requeue it at the front; outputs are kept. With the host tier a
    running victim is swapped out (its KV copied to host extents) when there is room and budget;
    otherwise its KV is dropped and recomputed when it resumes."""
    victim.preemptions += 1
    self.stats.preemptions += 1
    if self.tier is not None and self.tier.untake(victim.id):
      # Swapped in this very round: cancel that copy; its KV is still in its host extents.
      self._swap_in = [e for e in self._swap_in if e[2] != victim.id]
      self._release_slot(victim, keep_host=True)
      victim.status, victim.swapped = Status.WAITING, True
      self.stats.swap_preemptions += 1
    elif self._can_swap(victim):
      self._swap_out.extend((e, b, victim.id) for e, b in
                            self.tier.store(victim.id, self.allocator.block_table(victim.id), placed=False))
      self._release_slot(victim, keep_host=True)
      victim.status, victim.swapped, victim.tiered = Status.WAITING, True, True
      self.stats.swap_preemptions += 1
    else:
      self._release_slot(victim)
      victim.status, victim.num_computed = Status.WAITING, 0
    self.waiting.appendleft(victim)

  def _can_swap(self, req: Request) -> bool:
    if self.tier is None or req.status is not Status.RUNNING or req.num_computed < max(1, self.swap_min_tokens):
      return False
    n = self.tier.extents_for(len(self.allocator.block_table(req.id)))
    return n <= self.tier.num_free_extents and len(self._swap_out) + n <= self.rt.max_swap_extents

  def _place_cold(self) -> None:
    """Placement: when this step's growth and the next admission need more blocks than are free,
    move cold full blocks of running requests to host extents (the policy picks which), at most
    max_swap_extents extents per step and within the step's host read budget."""
    rt, bs, r = self.rt, self.rt.block_size, self.tier.extent
    run = np.flatnonzero(self._running)
    need = self._growth_need()
    if self.waiting and self._free_slots and not self.waiting[0].swapped:
      need += self.allocator.blocks_needed(self.waiting[0].num_tokens)
    deficit = need + rt.watermark_blocks - self.allocator.num_free_blocks
    reads = self._staged_extents(self.slots[i] for i in run)
    while deficit > 0 and len(self._swap_out) < rt.max_swap_extents and reads < rt.max_host_reads \
        and self.tier.num_free_extents:
      best, cands = None, None
      for i in run:  # the running request with the most device blocks and room on the host
        req = self.slots[i]
        if req is None or req.status is not Status.RUNNING:
          continue
        nt = len(self.allocator.block_table(req.id))
        room = rt.max_host_blocks_per_seq - req.host_tokens // bs
        if nt > 1 and room > 0 and (best is None or nt > len(cands) + 1):
          best, cands = req, np.arange(nt - 1)
      if best is None:
        return
      room = rt.max_host_blocks_per_seq - best.host_tokens // bs
      idx = tier_lib.pick_blocks(self.tier_policy, cands, best.mass, min(r, room, len(cands)))
      table = self.allocator.block_table(best.id)
      self._swap_out.extend((e, b, best.id) for e, b in self.tier.store(best.id, [table[i] for i in idx], placed=True))
      for i in idx[::-1]:
        self.allocator.drop_blocks(best.id, int(i), 1)
      if best.mass is not None:
        best.mass = np.delete(best.mass, idx)
      best.host_tokens += len(idx) * bs
      best.tiered = True
      self._kvoff[best.slot] = best.kv_offset + best.host_tokens
      self._refresh_tables(best)
      deficit -= len(idx)
      reads += 1
      self.stats.placed_blocks += len(idx)

  def _refresh_tables(self, req: Request, grew: bool = False) -> None:
    """Update the slot's cached block table and groups from the pager's runs.

    grew: the table only gained a block at its end (set one entry instead of rewriting the row).
    """
    s = req.slot
    runs = self.allocator.runs(req.id)
    p, l, k = runs[-1]
    if grew:
      self._bt[s, l + k - 1] = p + k - 1
    else:
      self._bt[s] = 0
      for p, l, k in runs:
        self._bt[s, l:l + k] = np.arange(p, p + k)
    req.capacity = (l + k) * self.rt.block_size
    self._cap[s] = req.capacity
    self._nruns[s] = len(runs)
    g = self._groups[s]
    if len(runs) <= self.rt.max_groups:
      g[:len(runs)] = runs
      g[len(runs):] = 0
      self._ngroups[s] = len(runs)
    else:
      g[:] = 0
      self._ngroups[s] = 0

  def schedule(self) -> StepPlan:
    """Admit, pick prefill chunks, reserve KV for this step's decode tokens (preempting if dry)."""
    if self.rt.max_host_reads:
      self._place_cold()
    self._admit()
    biggest = self.rt.prefill_buckets[-1]
    rows = [(r, r.num_computed, min(biggest, r.prefill_target - r.num_computed))
            for r in self._prefilling[:self.rt.max_prefill_seqs]]
    moves, preempted = [], []
    bs = self.rt.block_size
    run = np.flatnonzero(self._running)
    # Most sequences have room in their last block; only those at a block boundary touch the pager,
    # oldest admission first (when blocks run out the newest request in a slot is preempted).
    need = run[self._pos[run] - self._kvoff[run] >= self._cap[run]]
    for req in sorted((self.slots[i] for i in need), key=lambda r: (r.admitted_time, r.id)):
      while req.slot is not None:
        try:  # reserve the next whole block for the coming block_size tokens
          cow = self.allocator.append(req.id, req.capacity + bs - self.allocator.num_tokens(req.id))
        except OutOfBlocks:
          victim = self._order[-1]  # the newest request in a slot (or req itself)
          self._preempt(victim)
          preempted.append(victim)
          rows = [row for row in rows if row[0] is not victim]
          continue
        moves.extend(cow)
        self._refresh_tables(req, grew=not cow)
        break
    if preempted:
      run = np.flatnonzero(self._running)
    decode = [self.slots[i] for i in run]
    folds = self._plan_folds(decode)
    # plan_compaction ends the pager's round (copies and moves of one step); call it every step.
    compaction = self.allocator.plan_compaction(self.rt.max_groups, max(0, self.rt.max_moves - len(moves)))
    if compaction:
      moves.extend(compaction)
      for r in self._order:
        self._refresh_tables(r)
    if len(moves) > max(self.rt.max_moves, 0):
      raise RuntimeError(f"{len(moves)} block copies exceed max_moves={self.rt.max_moves}")
    return StepPlan(rows, decode, moves, preempted, folds, run.astype(np.int32))

  def _plan_folds(self, decode: list[Request]) -> list[tuple[int, int, float, float]]:
    """Fold (or drop) full blocks between the sinks and the exact window; free them."""
    bs = self.rt.block_size
    budget = self.rt.max_folds
    folds = []
    for req in decode:
      sc = req.summaries or self._summaries
      if sc is None:
        continue
      total = req.num_computed + 1  # tokens once this step's token is written
      nblocks = -(-(total - req.kv_offset) // bs)
      first_window = max(0, total - sc.window) // bs - req.kv_offset // bs  # table index
      excess = min(first_window, nblocks - 1) - sc.sink_blocks
      if excess <= 0:
        continue
      n = excess
      if sc.max_entries:
        n = min(n, sc.max_entries, budget)
        if n <= 0:
          continue
        if req.sum_base is None:
          try:
            self.allocator.allocate(("sum", req.id), [0])
          except OutOfBlocks:
            continue  # stays exact for now; folds once blocks free up
          req.sum_base = self.allocator.block_table(("sum", req.id))[0] * bs
        s = req.slot
        for i, j in enumerate(fold_targets(req.sum_counts, n, sc.max_entries)):
          if j == len(req.sum_counts):
            req.sum_counts.append(0)
          c = req.sum_counts[j]
          folds.append((int(self._bt[s, sc.sink_blocks + i]), req.sum_base + j, c / (c + bs), bs / (c + bs)))
          req.sum_counts[j] = c + bs
          self._sum_slots[s, j], self._sum_counts[s, j] = req.sum_base + j, c + bs
        budget -= n
      self.allocator.drop_blocks(req.id, sc.sink_blocks, n)
      req.kv_offset += n * bs
      self._kvoff[req.slot] = req.kv_offset
      self._refresh_tables(req)
    return folds

  # --------------------------------------------------------------------------- descriptors

  def build_prefill_descriptor(self, rows, moves=(), folds=()):
    n_max = max(n for _, _, n in rows)
    chunk = next(b for b in self.rt.prefill_buckets if b >= n_max)
    layout = desc_lib.prefill_layout(self.rt, chunk)
    d = layout.new()
    bs = self.rt.block_size
    d["top_p"][:] = 1.0
    for i, (req, start, n) in enumerate(rows):
      ids = req.all_ids
      pos = np.arange(start, start + n)
      d["tokens"][i, :n] = ids[start:start + n]
      d["positions"][i, :n] = pos
      d["write_slots"][i, :n] = self._bt[req.slot][pos // bs] * bs + pos % bs
      d["block_tables"][i] = self._bt[req.slot]
      d["lengths"][i] = start + n
      d["last_index"][i] = n - 1
      s = req.slot
      d["temperature"][i], d["top_p"][i], d["top_k"][i], d["seeds"][i] = (
          self._temp[s], self._topp[s], self._topk[s], self._seed[s])
    _put_block_ops(d, moves, folds)
    return chunk, layout.pack(d)

  def build_decode_descriptor(self, plan: StepPlan, moves=None, folds=None):
    """Pack the decode step's descriptor (vectorized over the plan's slots)."""
    d = self.dlayout.new()
    bs = self.rt.block_size
    slots = plan.decode_slots
    if slots is None:
      slots = np.fromiter((r.slot for r in plan.decode), np.int32, len(plan.decode))
    if len(slots):
      pos = self._pos[slots]
      rel = pos - self._kvoff[slots]  # position within the exact (table) history
      d["tokens"][slots] = self._tok[slots]
      d["positions"][slots] = pos
      d["lengths"][slots] = rel + 1
      d["write_slots"][slots] = self._bt[slots, rel // bs] * bs + pos % bs
    active = d["lengths"] > 0
    # Rows of free slots are zero; rows of prefilling slots are valid tables read with length 0.
    d["block_tables"][:] = self._bt
    d["groups"][:] = self._groups
    d["num_groups"][:] = np.where(active, self._ngroups, 0)
    d["temperature"][:], d["top_p"][:], d["top_k"][:], d["seeds"][:] = self._temp, self._topp, self._topk, self._seed
    d["summary_slots"][:], d["summary_counts"][:] = self._sum_slots, self._sum_counts
    if self.rt.max_host_reads:
      self._put_host_reads(d, plan)
    _put_block_ops(d, plan.moves if moves is None else moves, plan.folds if folds is None else folds)
    return self.dlayout.pack(d)

  def _put_host_reads(self, d, plan: StepPlan) -> None:
    """The extents the decode step stages per layer, and each slot's staged rows."""
    r, n = self.tier.extent, 0
    for req in plan.decode:
      if not req.host_tokens:
        continue
      extents, blocks = self.tier.placed(req.id)
      row = {}
      for e in extents:
        d["host_reads"][n] = e
        row[e] = n * r
        n += 1
      d["host_table"][req.slot, :len(blocks)] = [row[b // r] + b % r for b in blocks]
      d["host_count"][req.slot] = len(blocks)
    d["host_n"][0] = n

  # --------------------------------------------------------------------------- run + postprocess

  def put_descriptor(self, ints: np.ndarray, floats: np.ndarray):
    """A packed descriptor onto the device(s), placed as the compiled steps take it (one transfer)."""
    return jax.device_put((ints, floats), self._desc_sharding)

  def _executable(self, key: tuple, fn, layout: desc_lib.Layout, host=()):
    """One step's executable, compiled ahead of time on first use for this engine's exact arguments
    (state, pools, host pools and descriptor buffers, with their shardings and memory kinds), then
    kept. The engine never calls the jitted function again, so nothing that happens later in the
    process can trace or compile a step a second time: on a GPU, a JAX module imported later (by
    Pallas interpret mode, say) changed the tracing context and made every step retrace once."""
    exe = self._executables.get(key)
    if exe is None:
      t0 = time.perf_counter()
      ints, floats = self.put_descriptor(*layout.pack(layout.new()))
      exe = self._executables[key] = fn.lower(self.state, self.k_pool, self.v_pool, ints, floats, *host).compile()
      self.stats.compile_s += time.perf_counter() - t0
    return exe

  def compiled_decode(self):
    """The decode step's executable as `step()` runs it: `(state, k_pool, v_pool, ints, floats,
    *decode_host_args()) -> (tokens, k_pool, v_pool, ...)`, descriptor from `put_descriptor`."""
    return self._executable(("decode",), self.decode_step, self.dlayout, self.decode_host_args())

  def _compiled_prefill(self, chunk: int):
    return self._executable(("prefill", chunk), self._prefill_step(chunk), desc_lib.prefill_layout(self.rt, chunk))

  def _run(self, exe, ints, floats, host=()):
    ints, floats = self.put_descriptor(ints, floats)  # the one host->device transfer
    out = exe(self.state, self.k_pool, self.v_pool, ints, floats, *host)
    tokens, self.k_pool, self.v_pool = out[:3]
    if host and self.with_mass:
      self._mass = out[-1]
    return _host(tokens), (_host(out[3]) if self.with_logits else None)  # the one D2H sync

  def _run_swaps(self) -> tuple[int, int]:
    """The round's host tier copies (swap-outs, then swap-ins), one op before the step."""
    outs, ins = self._swap_out, self._swap_in
    d = self._swap_layout.new()
    for key, lst in (("out", outs), ("in", ins)):
      for i, (e, blocks, _) in enumerate(lst):
        d[f"{key}_ext"][i] = e
        d[f"{key}_blocks"][i, :len(blocks)] = blocks
    d["counts"][:] = len(outs), len(ins)
    ints, _ = self._swap_layout.pack(d)
    ints = jax.device_put(ints, self._desc_sharding)
    self.k_pool, self.v_pool, self.k_host, self.v_host = self.swap_step(
        self.k_pool, self.v_pool, self.k_host, self.v_host, ints)
    self.stats.swap_out_extents += len(outs)
    self.stats.swap_in_extents += len(ins)
    self._swap_out, self._swap_in = [], []
    return len(outs), len(ins)

  def decode_host_args(self) -> tuple:
    """Extra arguments of the decode step: the host pools when it reads the host tier."""
    return (self.k_host, self.v_host) if self.rt.max_host_reads else ()

  def _emit(self, req: Request, token: int, now: float, events: dict) -> None:
    if token == step_lib.NON_FINITE:  # its logits were NaN/inf: end it rather than emit garbage
      return self._finish(req, "error", now)
    if req.forced is not None:
      token = req.forced[len(req.output_ids)]
      if req.slot is not None:
        self._tok[req.slot] = token
    req.output_ids.append(int(token))
    req.token_times.append(now)
    if req.first_token_time is None:
      req.first_token_time = now
    if self.stats.first_token_s is None and self.stats._t_first_step is not None:
      self.stats.first_token_s = now - self.stats._t_first_step
    events.setdefault(req.id, []).append(int(token))
    sp = req.sampling
    reason = None
    if not sp.ignore_eos and int(token) in self.cfg.eos_ids:
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
      self._release_slot(req)

  def step(self) -> dict[int, list[int]]:
    """One engine step: schedule -> run -> postprocess. Returns {request id: new token ids}."""
    t0 = time.perf_counter()
    self.stats._t_first_step = self.stats._t_first_step or t0
    plan = self.schedule()
    events: dict[int, list[int]] = {}
    self.last_logits = {} if self.with_logits else None
    host = time.perf_counter() - t0
    if self.tier is not None:
      if self._swap_out or self._swap_in:
        plan.swaps = self._run_swaps()  # before any step reads or writes those blocks
      self.tier.end_round()
    if plan.prefill_rows:
      t1 = time.perf_counter()
      # Block copies run at the start of whichever step runs first, before any KV is read.
      chunk, (ints, floats) = self.build_prefill_descriptor(plan.prefill_rows, plan.moves, plan.folds)
      host += time.perf_counter() - t1
      tokens, logits = self._run(self._compiled_prefill(chunk), ints, floats)
      self.stats.prefill_steps += 1
      now = time.perf_counter()
      for i, (req, start, n) in enumerate(plan.prefill_rows):
        req.num_computed = start + n
        if req.num_computed == req.prefill_target:
          self.allocator.commit_tokens(req.id, req.all_ids[:req.num_computed])
          self._prefilling.remove(req)
          req.status = Status.RUNNING
          if len(req.output_ids) == 0:  # fresh request: its first token; a resumed one keeps its own
            if logits is not None:
              self.last_logits[req.id] = logits[i]
            self._emit(req, tokens[i], now, events)
          if req.slot is not None:  # not finished by its first token
            self.mark_running(req)
    if plan.decode:
      t1 = time.perf_counter()
      self._record_memory(plan)
      first = not plan.prefill_rows
      ints, floats = self.build_decode_descriptor(plan, plan.moves if first else [], plan.folds if first else [])
      host += time.perf_counter() - t1
      self.stats.host_us.append(host * 1e6)
      td = time.perf_counter()
      tokens, logits = self._run(self.compiled_decode(), ints, floats, self.decode_host_args())
      now = time.perf_counter()
      self.stats.step_s.append(now - td)
      self.stats.decode_steps += 1
      self.stats.moves += len(plan.moves)
      self.stats.folds += len(plan.folds)
      self.postprocess_decode(plan, tokens, now, events, logits)
    if self.rt.debug_poison_freed:
      self._poison_freed()
    return events

  def postprocess_decode(self, plan: StepPlan, tokens: np.ndarray, now: float, events: dict, logits=None) -> None:
    """Account a decode step's sampled tokens ([S] by slot): positions advance, tokens are emitted."""
    bs = self.rt.block_size
    slots = plan.decode_slots
    if self.with_mass:
      self._update_mass(plan)
    self._pos[slots] += 1
    self._tok[slots] = tokens[slots]  # forced tokens (teacher forcing) are set again in _emit
    for req in plan.decode:
      req.num_computed += 1
      if req.num_computed % bs == 0 and not req.kv_offset and not req.tiered:
        self.allocator.commit_tokens(req.id, req.all_ids[:req.num_computed])
      if logits is not None:
        self.last_logits[req.id] = logits[req.slot]
      self._emit(req, tokens[req.slot], now, events)

  def _update_mass(self, plan: StepPlan) -> None:
    """Attention policy: exponential moving average of each table block's attention mass."""
    mass = _host(self._mass)  # [S, MB]
    bs = self.rt.block_size
    for req in plan.decode:
      n = (int(self._pos[req.slot]) - int(self._kvoff[req.slot])) // bs + 1  # table blocks read
      m = mass[req.slot, :n]
      if req.mass is None or len(req.mass) > n:
        req.mass = m.copy()
      else:
        old = req.mass
        req.mass = m.copy()
        req.mass[:len(old)] = 0.8 * old + 0.2 * m[:len(old)]

  def _record_memory(self, plan: StepPlan) -> None:
    reserved = self.allocator.num_used_blocks
    if self.tier is not None:
      host_reads = self._staged_extents(plan.decode)
      self.stats.tier_series.append((*plan.swaps, host_reads, self.tier.num_used_blocks))
    live = sum(r.num_computed - r.kv_offset - r.host_tokens for r in self._order) + len(plan.decode)
    self.stats.reserved_series.append(reserved)
    self.stats.live_series.append(live)
    self.stats.peak_reserved_blocks = max(self.stats.peak_reserved_blocks, reserved)
    self.stats.peak_live_tokens = max(self.stats.peak_live_tokens, live)
    if plan.decode:
      self.stats.groups_per_seq.append(float(np.mean(self._nruns[[r.slot for r in plan.decode]])))

  def _poison_freed(self) -> None:
    """Debug: fill blocks that were just freed with NaN so any read of them would show."""
    freed = self.allocator.freed_since_last_call()
    if not freed:
      return
    if self._poison is None:
      def poison(k, v, idx):
        return k.at[:, :, idx].set(jnp.nan), v.at[:, :, idx].set(jnp.nan)
      # The pools keep their placement: the compiled steps take nothing else.
      self._poison = jax.jit(poison, out_shardings=(self.k_pool.sharding, self.v_pool.sharding))
    n = self.rt.num_blocks
    idx = np.zeros((1 << max(0, (len(freed) - 1).bit_length()),), np.int32)  # few shapes: powers of two
    idx[:len(freed)] = freed
    idx[len(freed):] = freed[0]
    assert 0 < min(freed) and max(freed) < n
    self.k_pool, self.v_pool = self._poison(self.k_pool, self.v_pool, idx)

  # --------------------------------------------------------------------------- high-level API

  def output(self, rid: int, new_ids=()) -> RequestOutput:
    r = self.requests[rid]
    text = self.tokenizer.decode(r.output_ids) if self.tokenizer is not None else None
    return RequestOutput(r.id, r.prompt_ids, list(r.output_ids), list(new_ids), r.done, r.finish_reason, text)

  def generate(self, prompts: Iterable, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
               progress: bool = False, on_step=None) -> list[RequestOutput]:
    """Decode prompts (strings, needs a tokenizer, or lists of token ids) to completion, in order.

    on_step: called with each step's {request id: new token ids}."""
    prompts = list(prompts)
    sps = sampling if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * len(prompts)
    if len(sps) != len(prompts):
      raise ValueError(f"{len(sps)} sampling params for {len(prompts)} prompts")
    ids = []
    try:  # all or nothing: a bad prompt withdraws the ones queued before it
      for p, sp in zip(prompts, sps):
        if isinstance(p, str):
          if self.tokenizer is None:
            raise ValueError("string prompts need a tokenizer")
          p = self.tokenizer.encode(p)
        ids.append(self.add_request(p, sp))
    except Exception:
      for i in ids:
        self.abort(i)
        del self.requests[i]
      raise
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=sum(sp.max_new_tokens for sp in sps), unit="tok", desc="decode", leave=False)
    while any(not self.requests[i].done for i in ids):
      events = self.step()
      if on_step is not None:
        on_step(events)
      if bar is not None:
        bar.update(sum(len(v) for v in events.values()))
    if bar is not None:
      bar.close()
    return [self.output(i) for i in ids]

  def summary(self) -> dict:
    """The stats object of scripts/decode.py's JSON."""
    st, rt, cfg = self.stats, self.rt, self.cfg
    itemsize = jnp.dtype(rt.dtype).itemsize
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * rt.block_size * cfg.head_dim * itemsize
    token_bytes = block_bytes // rt.block_size
    gen = sum(len(r.output_ids) for r in self.requests.values())
    return {
        "engine": self.kind,
        "decode_compiles": self.compiles.decode,
        "prefill_compiles": self.compiles.prefill,
        "steps": st.decode_steps,
        "prefill_steps": st.prefill_steps,
        "reserved_kv_bytes": st.peak_reserved_blocks * block_bytes,
        "live_kv_bytes": st.peak_live_tokens * token_bytes,
        "pool_kv_bytes": (rt.num_blocks - 1) * block_bytes,
        "preemptions": st.preemptions,
        "prefix_hit_blocks": st.prefix_hit_blocks,
        "mean_groups_per_seq": float(np.mean(st.groups_per_seq)) if st.groups_per_seq else 0.0,
        "block_moves": st.moves,
        "host_us_per_step": float(np.median(st.host_us)) if st.host_us else 0.0,
        "generated_tokens": gen,
        "startup_s": {"engine_build": st.build_s, "compile": st.compile_s, "first_token": st.first_token_s},
        **({} if self.tier is None else {
            "tier_policy": self.tier_policy, "host_pool_kv_bytes": (rt.host_extents - 1) * rt.host_extent * block_bytes,
            "placed_blocks": st.placed_blocks, "swap_preemptions": st.swap_preemptions,
            "swap_out_extents": st.swap_out_extents, "swap_in_extents": st.swap_in_extents,
            "peak_host_blocks": max((t[3] for t in st.tier_series), default=0)}),
    }
