"""Continuous-batching engine: schedule -> pack one descriptor -> run the compiled step -> postprocess.

    engine = Engine.from_checkpoint(path, RuntimeConfig(...))
    outs = engine.generate(["The capital of France is"], SamplingParams(max_new_tokens=16))

or streaming: `engine.add_request(ids, sampling)`, then `engine.step()` while `engine.has_work()`.
The host half is `engine.sched`; the compiled decode step `engine.decode_step` reads the descriptor
of `engine.build_decode_descriptor(plan)` (docs/notebook.md drives it by hand).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from tqdm import tqdm

from kvrm_jax import descriptor as desc_lib
from kvrm_jax import exe_store
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.model import llama as model_lib
from kvrm_jax.model.checkpoint import load_checkpoint
from kvrm_jax.sched import stats as stats_lib
from kvrm_jax.sched.request import RequestOutput, SamplingParams
from kvrm_jax.sched.scheduler import Scheduler, StepPlan
from kvrm_jax.sched.static import static_runtime
from kvrm_jax.sched.summaries import SummaryConfig
from kvrm_jax.step import gemm, sharding
from kvrm_jax.step import steps as step_lib
from kvrm_jax.step.block_ops import init_pools, poison_blocks
from kvrm_jax.step.sampling import resolved_sampler
from kvrm_jax.step.tier import init_host_pools


def _host(x) -> np.ndarray:
  """A replicated output to host; across processes (multi-host) each reads its local copy."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _step_name(key: tuple) -> str:
  if key[0] == "decode":
    return "decode step" if len(key) == 1 else f"decode step ({key[1]} rows)"
  if key[0] == "prefill":
    return f"prefill step ({key[1]} tokens)"
  return f"mixed step ({key[1]} tile{'s' if key[1] != 1 else ''})"


# Stored executables loaded at once by a warm-up (Engine._load_stored).
LOAD_THREADS = 16


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
    gemm.check(rt)
    rt = static_runtime(rt) if kind == "static" else rt
    self.sched = Scheduler(rt, kind=kind, vocab_size=cfg.vocab_size, max_position=cfg.max_position,
                           eos_ids=cfg.eos_ids, tokenizer=tokenizer, summaries=summaries, tier_policy=tier_policy,
                           swap_min_tokens=swap_min_tokens)
    self.rt, self.kind, self.tokenizer, self.mesh, self.with_logits = rt, kind, tokenizer, mesh, with_logits
    self.graphdef, self.state = model_lib.split(model)
    # The engine computes in its runtime dtype, whatever the model was built in: the KV pool holds
    # rt.dtype, and the attention kernels take q, k and v of one dtype.
    dt = jnp.dtype(rt.dtype)
    self.state = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, self.state)
    specs, pool_sharding, self._desc_sharding = None, None, None
    if mesh is not None:
      cfg, self.graphdef, self.state, specs = sharding.place_model(cfg, self.graphdef, self.state, mesh)
      pool_sharding = NamedSharding(mesh, sharding.POOL_SPEC)
      self._desc_sharding = NamedSharding(mesh, sharding.REPLICATED)
    self.cfg = cfg
    self.k_pool, self.v_pool = init_pools(cfg, rt, sharding=pool_sharding)
    self.with_mass = bool(rt.max_host_reads) and tier_policy == "attention"
    self.decode_step, self._prefill_step, self._mixed_step, self.compiles, self._decode_step_for = step_lib.build_steps(
        self.graphdef, cfg, rt, with_logits=with_logits, mesh=mesh, state_specs=specs, with_mass=self.with_mass)
    self.dlayout = desc_lib.decode_layout(rt)
    # ("decode",) / ("decode", rows) / ("prefill", chunk) / ("mixed", tiles) -> AOT executable
    self._executables: dict = {}
    # Called as on_compile(name, seconds) after each executable is compiled (start-up progress).
    self.on_compile: Callable[[str, float], None] | None = None
    # compile_all(background=True): the steps still compiling in a thread of their own (until then
    # each step runs in the smallest compiled executable that holds it), and that thread's failure.
    self._pending: set = set()
    self._warm_thread: threading.Thread | None = None
    self.warm_error: BaseException | None = None
    if rt.host_blocks:
      self.k_host, self.v_host = init_host_pools(cfg, rt, mesh)
      self.swap_step = step_lib.build_swap(rt, mesh, tuple(x.sharding for x in (
          self.k_pool, self.v_pool, self.k_host, self.v_host)))
      self._swap_layout = desc_lib.swap_layout(rt)
      self._run_swaps([], [])  # compile the swap op now (it copies nothing), not at the first preemption
    self.last_logits = None  # with_logits: {request id: [V] logits of its latest sampled token}
    # RuntimeConfig.pipeline: (plan, device tokens, positions after, dispatch time) of the decode
    # step dispatched but not read yet; the next decode step takes its tokens as an argument (the
    # inputs of the slots marked FEED_TOKEN), with no other device call. _no_feed: none in flight.
    self._inflight = None
    if rt.pipeline:  # per decode row count
      self._no_feed = {r: jax.device_put(np.zeros(r, np.int32), self._desc_sharding) for r in rt.decode_rows}
    self.stats.build_s = time.perf_counter() - t_build

  @property
  def requests(self) -> dict:
    return self.sched.requests

  @property
  def stats(self) -> stats_lib.EngineStats:
    return self.sched.stats

  @stats.setter
  def stats(self, st: stats_lib.EngineStats) -> None:  # benchmarks reset the counters between runs
    self.sched.stats = st

  @classmethod
  def from_checkpoint(cls, path, rt: RuntimeConfig, **kw) -> "Engine":
    cfg, model, tok = load_checkpoint(path, rt.dtype)
    return cls(cfg, model, rt, tokenizer=tok, **kw)

  # --------------------------------------------------------------------------- requests

  def add_request(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None,
                  arrival: float | None = None, forced_output: Sequence[int] | None = None,
                  summaries: SummaryConfig | None = None) -> int:
    """Queue a request; raises RequestError if it can never be served.

    forced_output: teacher forcing: emit these tokens instead of sampled ones (the step still
    computes logits for them; evaluation and trace replay use this).
    summaries: this request's far-history summary policy (default: the scheduler's `summaries`).
    """
    return self.sched.add(prompt_ids, sampling, arrival, forced_output, summaries)

  def abort(self, rid: int) -> bool:
    """Stop a request now (queued or running) and free its KV; False if it had already ended."""
    return self.sched.abort(rid)

  def has_work(self) -> bool:
    return self.sched.has_work() or self._inflight is not None

  # --------------------------------------------------------------------------- one step

  def step(self) -> dict[int, list[int]]:
    """One engine step: schedule -> pack -> run -> postprocess. Returns {request id: new token ids}.

    With RuntimeConfig.pipeline, a step of running sequences only is dispatched before the tokens
    of the step in flight are read: the call returns those earlier tokens (a call may return none,
    and one more call lands the last step; has_work() says so)."""
    if not self.rt.pipeline or self.with_logits:
      return self._step_sync()
    events: dict[int, list[int]] = {}
    if self.sched.pipelinable() and not self._fewer_rows_due():
      self._step_ahead(events)
    else:
      self.flush(events)  # this step's plan needs the tokens in flight
      if self.sched.has_work():
        for rid, toks in self._step_sync().items():
          events.setdefault(rid, []).extend(toks)
    return events

  def _fewer_rows_due(self) -> bool:
    """With decode buckets: the step in flight has more rows than its requests need once moved to
    the lowest slots (that move waits for a step with nothing in flight)."""
    inflight, rt = self._inflight, self.rt
    return (bool(rt.decode_buckets) and inflight is not None
            and self._rows_for(len(self.sched.slots.order)) < inflight[1].shape[0])

  def _rows(self, plan: StepPlan) -> int:
    """Rows of a decode step for `plan`: the smallest RuntimeConfig.decode_rows count holding its slots."""
    return self._rows_for(1 + int(np.max(plan.decode_slots, initial=0)))

  def _rows_for(self, n: int) -> int:
    """RuntimeConfig.rows_for(n) among the decode steps compiled so far (all, once none is pending)."""
    return next(r for r in self.rt.decode_rows if r >= n and self._decode_key(r) not in self._pending)

  def _ready(self, kind: str, buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The prefill or tile buckets whose executables are not pending (their largest never is)."""
    return tuple(b for b in buckets if (kind, b) not in self._pending)

  def _step_ahead(self, events: dict) -> None:
    """Plan, pack and dispatch a decode step now, its input tokens (where the step in flight gives
    them) taken on the device; then read and account the step in flight."""
    t0 = time.perf_counter()
    self.stats._t_first_step = self.stats._t_first_step or t0
    prev = self._inflight
    plan = self.schedule()
    # The rows of the step in flight (its tokens feed this one), else what the plan needs.
    rows = prev[1].shape[0] if prev is not None else self._rows(plan)
    self.sched.record_memory(plan)
    ints, floats = self.build_decode_descriptor(plan, rows=rows)
    ints, floats = self.put_descriptor(ints, floats)
    self.stats.host_us.append((time.perf_counter() - t0) * 1e6)
    out = self.compiled_decode(rows)(self.state, self.k_pool, self.v_pool, ints, floats,
                                     *self.decode_args(None if prev is None else prev[1], rows))
    tokens, self.k_pool, self.v_pool = out[:3]
    if tokens.is_fully_addressable:  # the tokens' copy to the host queued now, behind this step only
      tokens.copy_to_host_async()
    self.stats.decode_steps += 1
    self.stats.pipelined_steps += 1
    self.stats.decode_rows.append(rows)
    self.stats.moves += len(plan.moves)
    self._inflight = (plan, tokens, self.sched.advance(plan), time.perf_counter())
    if prev is not None:
      self._land(prev, events, latest=False)
      if all(r.done for r in plan.decode):  # every row ended at the step just read: nothing to land
        self._inflight = None
    if self.rt.debug_poison_freed and (freed := self.sched.allocator.freed_since_last_call()):
      self.k_pool, self.v_pool = poison_blocks(self.k_pool, self.v_pool, freed)  # after the step in flight

  def flush(self, events: dict | None = None) -> dict[int, list[int]]:
    """Read and account the decode step in flight, if any (RuntimeConfig.pipeline); its new
    tokens go into `events` (returned)."""
    events = {} if events is None else events
    if self._inflight is not None:
      self._land(self._inflight, events, latest=True)
      self._inflight = None
    return events

  def _land(self, inflight, events: dict, latest: bool) -> None:
    plan, tokens, pos_after, t_dispatch = inflight
    tokens = _host(tokens)  # the sync: the step dispatched after it (if any) keeps the device busy
    now = time.perf_counter()
    self.stats.step_s.append(now - t_dispatch)
    self.sched.land_decode(plan, pos_after, tokens, now, events, latest)

  def _step_sync(self) -> dict[int, list[int]]:
    t0 = time.perf_counter()
    self.stats._t_first_step = self.stats._t_first_step or t0
    self.stats.slot_moves += self.sched.compact_slots()  # nothing in flight: requests may move
    plan = self.schedule()
    events: dict[int, list[int]] = {}
    self.last_logits = {} if self.with_logits else None
    host = time.perf_counter() - t0
    if self.sched.tier is not None:
      if self.sched.swap_out or self.sched.swap_in:
        plan.swaps = self._run_swaps(*self.sched.take_swaps())  # before any step reads or writes those blocks
      self.sched.tier.end_round()
    mixed = bool(plan.prefill_rows) and bool(self.rt.step_tokens)  # else: a prefill call, then a decode call
    if mixed:
      self._mixed(plan, events, host)
    elif plan.prefill_rows:
      t1 = time.perf_counter()
      # Block copies run at the start of whichever step runs first, before any KV is read.
      chunk, (ints, floats) = desc_lib.build_prefill(self.rt, plan.prefill_rows, self.sched.slots, plan.moves,
                                                     plan.folds, self._ready("prefill", self.rt.prefill_buckets))
      host += time.perf_counter() - t1
      tokens, logits = self._run(self._prefill_exe(chunk), ints, floats)
      self.stats.prefill_steps += 1
      self._count_prompt(plan, self.rt.max_prefill_seqs * chunk)
      firsts = self.sched.finish_prefill(plan, tokens, logits, time.perf_counter(), events)
      if logits is not None:
        self.last_logits.update(firsts)
    if plan.decode and not mixed:
      t1 = time.perf_counter()
      self.sched.record_memory(plan)
      first = not plan.prefill_rows
      rows = self._rows(plan)
      ints, floats = self.build_decode_descriptor(plan, plan.moves if first else [], plan.folds if first else [],
                                                  rows=rows)
      host += time.perf_counter() - t1
      self.stats.host_us.append(host * 1e6)
      td = time.perf_counter()
      tokens, logits = self._run(self.compiled_decode(rows), ints, floats, self.decode_args(rows=rows))
      now = time.perf_counter()
      self.stats.step_s.append(now - td)
      self.stats.decode_steps += 1
      self.stats.decode_rows.append(rows)
      self.stats.moves += len(plan.moves)
      self.stats.folds += len(plan.folds)
      if logits is not None:
        self.last_logits.update({r.id: logits[r.slot] for r in plan.decode})
      self.sched.finish_decode(plan, tokens, now, events, _host(self._mass) if self.with_mass else None)
    if self.rt.debug_poison_freed and (freed := self.sched.allocator.freed_since_last_call()):
      self.k_pool, self.v_pool = poison_blocks(self.k_pool, self.v_pool, freed)  # debug: NaN where freed
    return events

  def _mixed(self, plan: StepPlan, events: dict, host: float) -> None:
    """One mixed step: every decode row and the plan's prompt chunks in one device call, one sync."""
    t1 = time.perf_counter()
    if plan.decode:
      self.sched.record_memory(plan)  # per step with decode rows, as the decode step records it
    sl, tier = self.sched.slots, self.sched.tier
    host_reads = [(r.slot, *tier.placed(r.id)) for r in plan.decode if sl.host[r.slot]] if tier else ()
    n_tiles, (ints, floats), last_tile = desc_lib.build_mixed(self.rt, plan.prefill_rows, sl, plan.decode_slots,
                                                              plan.moves, plan.folds, host_reads,
                                                              self._ready("mixed", self.rt.tile_buckets))
    self.stats.host_us.append((host + time.perf_counter() - t1) * 1e6)
    td = time.perf_counter()
    tokens, logits = self._run(self._mixed_exe(n_tiles), ints, floats, self.decode_host_args())
    now = time.perf_counter()
    self.stats.step_s.append(now - td)
    self.stats.mixed_steps += 1
    self.stats.prefill_steps += 1
    self._count_prompt(plan, n_tiles * self.rt.tile)
    self.stats.moves += len(plan.moves)
    self.stats.folds += len(plan.folds)
    s = self.rt.max_slots
    rows = np.asarray(last_tile, np.int64) + s  # each prompt chunk's last tile, in the step's outputs
    firsts = self.sched.finish_prefill(plan, tokens[rows], None if logits is None else logits[rows], now, events)
    if logits is not None:
      self.last_logits.update(firsts)
      self.last_logits.update({r.id: logits[r.slot] for r in plan.decode})
    if plan.decode:
      self.stats.decode_steps += 1
      self.sched.finish_decode(plan, tokens[:s], now, events, _host(self._mass) if self.with_mass else None)

  def _count_prompt(self, plan: StepPlan, positions: int) -> None:
    self.stats.prompt_tokens += sum(n for _, _, n in plan.prefill_rows)
    self.stats.prompt_positions += positions

  def schedule(self) -> StepPlan:
    """The host half's plan of the next step (admission, growth, preemption, folds, compaction)."""
    return self.sched.schedule()

  def build_decode_descriptor(self, plan: StepPlan, moves=None, folds=None, rows: int | None = None):
    """Pack the decode step's descriptor (ints, floats) for `plan`, over slots 0..rows-1 (default:
    all; a RuntimeConfig.decode_rows count holding every slot of the plan)."""
    sl, tier = self.sched.slots, self.sched.tier
    host_reads = [(r.slot, *tier.placed(r.id)) for r in plan.decode if sl.host[r.slot]] if tier else ()
    return desc_lib.build_decode(desc_lib.decode_layout(self.rt, rows), self.rt, sl, plan.decode_slots,
                                 plan.moves if moves is None else moves, plan.folds if folds is None else folds,
                                 host_reads)

  def decode_host_args(self) -> tuple:
    """The host pools when the decode and mixed steps read the host tier (extra arguments)."""
    return (self.k_host, self.v_host) if self.rt.max_host_reads else ()

  def decode_args(self, prev=None, rows: int | None = None) -> tuple:
    """Extra arguments of the decode step (of `rows` rows, default all): decode_host_args(), then
    with RuntimeConfig.pipeline the tokens [rows] of the decode step in flight, `prev` (none in
    flight: zeros, unread)."""
    feed = ((self._no_feed[rows or self.rt.max_slots] if prev is None else prev),) if self.rt.pipeline else ()
    return self.decode_host_args() + feed

  def put_descriptor(self, ints: np.ndarray, floats: np.ndarray):
    """A packed descriptor onto the device(s), placed as the compiled steps take it (one transfer)."""
    return jax.device_put((ints, floats), self._desc_sharding)

  def _executable(self, key: tuple, fn, layout: desc_lib.Layout, host=()):
    """A step compiled ahead of time on first use for this engine's exact arguments, then kept: nothing
    later in the process (a JAX module Pallas interpret mode imports, say) can make it trace again."""
    exe = self._executables.get(key)
    if exe is None:
      t0 = time.perf_counter()
      skey, exe = self._from_store(key, layout, host)
      if exe is None:
        exe = exe_store.compile_and_save(skey, self._lower(fn, layout, host))
      exe = self._keep(key, exe, time.perf_counter() - t0)
    return exe

  def _from_store(self, key: tuple, layout: desc_lib.Layout, host=()):
    """(the executable store's key of step `key`, its stored executable or None)."""
    skey = self._store_key(key, layout, host)
    return skey, exe_store.load(skey, self._devices())

  def _store_key(self, key: tuple, layout: desc_lib.Layout, host=()) -> str | None:
    """The executable store's key of step `key` (kvrm_jax.exe_store; None when it is off):
    what decides its program besides the environment, with no tracing."""
    if not exe_store.active():
      return None
    args = (self.state, self.k_pool, self.v_pool, *host)
    avals = [(tuple(x.shape), str(x.dtype), repr(getattr(x, "sharding", None))) for x in jax.tree.leaves(args)]
    ints, floats = layout.pack(layout.new())
    mesh = None if self.mesh is None else (self.mesh.axis_names, self.mesh.devices.shape,
                                           tuple(d.id for d in self.mesh.devices.flat))
    return exe_store.key(key, self.kind, self.with_logits, self.with_mass, repr(self.cfg), repr(self.rt), mesh,
                         str(jax.tree.structure(args)), avals, (ints.shape, str(ints.dtype)),
                         (floats.shape, str(floats.dtype)), repr(self._desc_sharding))

  def _devices(self) -> list:
    """The devices the steps run on, in the mesh's order."""
    if self.mesh is not None:
      return list(self.mesh.devices.flat)
    return sorted(self.k_pool.sharding.device_set, key=lambda d: d.id)

  def _lower(self, fn, layout: desc_lib.Layout, host=()):
    # Shapes, dtypes and placements only: a compile thread must not hold the pools the steps donate.
    ints, floats = self.put_descriptor(*layout.pack(layout.new()))
    state, k_pool, v_pool = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                         (self.state, self.k_pool, self.v_pool))
    return fn.lower(state, k_pool, v_pool, ints, floats, *host)

  def _keep(self, key: tuple, exe, dt: float):
    self._executables[key] = exe
    self._pending.discard(key)  # after it is in place: a step may pick it from now on
    self.stats.compile_s += dt
    if self.on_compile is not None:
      self.on_compile(_step_name(key), dt)
    return exe

  def _prefill_exe(self, chunk: int):
    return self._executable(("prefill", chunk), *self._prefill_spec(chunk))

  def _prefill_spec(self, chunk: int):
    return self._prefill_step(chunk), desc_lib.prefill_layout(self.rt, chunk)

  def _mixed_exe(self, n_tiles: int):
    return self._executable(("mixed", n_tiles), *self._mixed_spec(n_tiles))

  def _mixed_spec(self, n_tiles: int):
    return self._mixed_step(n_tiles), desc_lib.mixed_layout(self.rt, n_tiles), self.decode_host_args()

  def _decode_key(self, rows: int) -> tuple:
    return ("decode",) if rows == self.rt.max_slots else ("decode", rows)

  def _decode_spec(self, rows: int | None):
    key = self._decode_key(rows or self.rt.max_slots)
    if len(key) == 1:
      return key, (self.decode_step, self.dlayout, self.decode_args())
    return key, (self._decode_step_for(rows), desc_lib.decode_layout(self.rt, rows), self.decode_args(rows=rows))

  def compile_all(self, threads: int = 1, background: bool = False) -> tuple[int, float]:
    """Compile every executable the steps can use before the first request: the decode step(s) and
    each prefill bucket, or each tile bucket with mixed steps. Returns (executables compiled,
    seconds).

    threads > 1 traces and lowers them one after another (Python) and runs XLA's compiles in that
    many threads at once. With XLA's GEMM autotuning on that was no faster (four Llama-3-8B-shaped
    steps at once took 158 s on an H100, one after another 125 s) and disturbed the autotuner's
    timings, so the default is one at a time (docs/step.md, "Start-up").

    background: compile now only the steps that can run every step (the decode step over all slots
    and the largest tile or prefill bucket, at once), and the others in a thread while the engine
    serves; until one is ready, its steps run in the smallest compiled executable that holds them
    (the same tokens, more padding). `wait_compiled()` joins that thread. Returns what was compiled
    before this call returned."""
    t0, before = time.perf_counter(), len(self._executables)
    specs = [self._decode_spec(rows) for rows in self.rt.decode_rows]
    specs += [(("mixed", n), self._mixed_spec(n)) for n in self.rt.tile_buckets]
    specs += [(("prefill", c), self._prefill_spec(c)) for c in (() if self.rt.step_tokens else self.rt.prefill_buckets)]
    specs = [(key, spec) for key, spec in specs if key not in self._executables and key not in self._pending]
    if background:
      largest = ("mixed", self.rt.tile_buckets[-1]) if self.rt.step_tokens else ("prefill", self.rt.prefill_buckets[-1])
      now = [(k, sp) for k, sp in specs if k in (("decode",), largest)]
      later = [(k, sp) for k, sp in specs if k not in (("decode",), largest)]
      self._compile(now, max(threads, len(now)))
      if later:
        self._pending |= {k for k, _ in later}
        self._warm_thread = threading.Thread(target=self._compile_later, args=(later, threads),
                                             name="kvrm-compile", daemon=True)
        self._warm_thread.start()
    else:
      self._compile(specs, threads)
    return len(self._executables) - before, time.perf_counter() - t0

  @property
  def compiles_pending(self) -> int:
    """Steps that compile_all(background=True) is still compiling."""
    return len(self._pending)

  def wait_compiled(self, timeout: float | None = None) -> bool:
    """Wait for compile_all(background=True)'s thread; True once no step is pending."""
    if self._warm_thread is not None:
      self._warm_thread.join(timeout)
    return not self._pending

  def _compile_later(self, specs, threads: int) -> None:
    try:
      self._compile(specs, threads)
    except BaseException as e:  # noqa: BLE001  (steps keep to the executables compiled so far)
      self.warm_error = e

  def _compile(self, specs, threads: int) -> None:
    left = self._load_stored(specs)  # the executable store's entries first: nothing to lower for them

    def compile_one(skey, lowered):
      t = time.perf_counter()
      return exe_store.compile_and_save(skey, lowered), time.perf_counter() - t
    if threads <= 1:
      for key, spec, skey in left:
        self._keep(key, *compile_one(skey, self._lower(*spec)))
    else:
      todo = [(key, skey, self._lower(*spec)) for key, spec, skey in left]
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for (key, _, _), fut in zip(todo, [pool.submit(compile_one, skey, low) for _, skey, low in todo]):
          self._keep(key, *fut.result())

  def _load_stored(self, specs) -> list:
    """Load the executable store's entries of `specs` at once (a load runs outside the interpreter
    lock: on a GPU host each took 0.6-1.1 s, one after another most of a start from the cache); the
    specs left to compile, in order, as (key, spec, store key)."""
    if not exe_store.active() or not specs:
      return [(key, spec, None) for key, spec in specs]

    def load(key, spec):
      t = time.perf_counter()
      skey, exe = self._from_store(key, *spec[1:])
      return skey, exe, time.perf_counter() - t
    with concurrent.futures.ThreadPoolExecutor(min(len(specs), LOAD_THREADS)) as pool:
      loaded = [f.result() for f in [pool.submit(load, key, spec) for key, spec in specs]]
    left = []
    for (key, spec), (skey, exe, dt) in zip(specs, loaded):
      if exe is None:
        left.append((key, spec, skey))
      else:
        self._keep(key, exe, dt)
    return left

  def compiled_decode(self, rows: int | None = None):
    """The decode step's executable (over `rows` slots, default all) as `step()` runs it:
    `(state, k_pool, v_pool, ints, floats, *decode_args(rows=rows)) -> (tokens, k_pool, v_pool, ...)`,
    descriptor from `put_descriptor`."""
    key, spec = self._decode_spec(rows)
    return self._executable(key, *spec)

  def _run(self, exe, ints, floats, host=()):
    out = exe(self.state, self.k_pool, self.v_pool, *self.put_descriptor(ints, floats), *host)  # one transfer
    tokens, self.k_pool, self.v_pool = out[:3]
    if self.with_mass and len(out) > 3 + self.with_logits:
      self._mass = out[-1]
    return _host(tokens), (_host(out[3]) if self.with_logits else None)  # the one D2H sync

  def _run_swaps(self, outs, ins) -> tuple[int, int]:
    """The round's host tier copies (swap-outs, then swap-ins), one op before the step."""
    ints = jax.device_put(desc_lib.build_swap(self._swap_layout, outs, ins), self._desc_sharding)
    self.k_pool, self.v_pool, self.k_host, self.v_host = self.swap_step(
        self.k_pool, self.v_pool, self.k_host, self.v_host, ints)
    return len(outs), len(ins)

  # --------------------------------------------------------------------------- high-level API

  def output(self, rid: int, new_ids=()) -> RequestOutput:
    r = self.requests[rid]
    text = self.tokenizer.decode(r.output_ids) if self.tokenizer is not None else None
    return RequestOutput(r.id, r.prompt_ids, list(r.output_ids), list(new_ids), r.done, r.finish_reason, text)

  def generate(self, prompts: Iterable, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
               progress: bool = False, on_step=None) -> list[RequestOutput]:
    """Decode prompts (strings, needs a tokenizer, or lists of token ids) to completion, in order.
    All or nothing: a bad prompt withdraws the ones queued before it. on_step: called with each
    step's {request id: new token ids}."""
    prompts = list(prompts)
    sps = sampling if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * len(prompts)
    if len(sps) != len(prompts):
      raise ValueError(f"{len(sps)} sampling params for {len(prompts)} prompts")
    if self.tokenizer is None and any(isinstance(p, str) for p in prompts):
      raise ValueError("string prompts need a tokenizer")
    ids = self.sched.add_all([(self.tokenizer.encode(p) if isinstance(p, str) else p, sp) for p, sp in zip(prompts, sps)])
    bar = tqdm(total=sum(sp.max_new_tokens for sp in sps), unit="tok", desc="decode", leave=False, disable=not progress)
    while any(not self.requests[i].done for i in ids):
      events = self.step()
      if on_step is not None:
        on_step(events)
      bar.update(sum(len(v) for v in events.values()))
    bar.close()
    return [self.output(i) for i in ids]

  def summary(self) -> dict:
    """The stats object of scripts/decode.py's JSON."""
    return stats_lib.summary(self.stats, kind=self.kind, compiles=self.compiles, rt=self.rt, cfg=self.cfg,
                             itemsize=jnp.dtype(self.rt.dtype).itemsize,
                             generated=sum(len(r.output_ids) for r in self.requests.values()),
                             tier_policy=None if self.sched.tier is None else self.sched.tier_policy,
                             sampler=resolved_sampler(self.rt))
