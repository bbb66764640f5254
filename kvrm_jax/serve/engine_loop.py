"""The engine in one thread beside the server's event loop.

Requests enter through a thread-safe inbox; each request's token events go back to the event loop
through its own asyncio queue, all events of one step in one `loop.call_soon_threadsafe` call. The
engine is never touched from any other thread, so its compiled step stays one executable per shape
and its host state needs no lock.

Every import the serving package makes from the rest of kvrm_jax is in this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import sys
import threading
import time

import jax
import jax.numpy as jnp
from flax import nnx

from kvrm_jax import compile_cache
from kvrm_jax.config import PRESETS, ModelConfig
from kvrm_jax.model import checkpoint as ckpt
from kvrm_jax.model.llama import Llama
from kvrm_jax.model.tokenizer import Tokenizer
from kvrm_jax.step import sharding

from kvrm_jax.cli import UserError, add_runtime_args, load_model, make_engine, run_main
from kvrm_jax.engine import Engine
from kvrm_jax.sched.request import RequestError, SamplingParams
from kvrm_jax.sched.scheduler import check_sampling

__all__ = ["Engine", "EngineLoop", "Event", "Handle", "Overloaded", "RequestError", "SamplingParams", "UserError",
           "add_runtime_args", "check_sampling", "compile_cache", "load_model", "load_preset", "load_tokenizer",
           "make_engine", "run_main", "warm_up"]


def load_tokenizer(checkpoint=None, cache_dir=None):
  """The tokenizer of a checkpoint folder (default: the bundled SmolLM2 model)."""
  path = checkpoint or ckpt.ensure_bundled_checkpoint(cache_dir, progress=False)
  with open(f"{path}/tokenizer.json", encoding="utf-8") as f:
    return Tokenizer.from_json_str(f.read())


def load_preset(args):
  """Like kvrm_jax.cli.load_model, for a model shape with random weights (`--preset`, benchmarks):
  (cfg, model, tokenizer, mesh, dtype, name). Text goes through the bundled tokenizer; ids past its
  vocabulary decode to nothing, so send prompts as token ids. Without the bundled model the
  tokenizer is None (token ids only)."""
  try:
    cfg = ModelConfig.from_name(args.preset)
    mesh = None if args.tp is None else sharding.make_mesh(args.tp)
  except ValueError as e:
    raise UserError(str(e)) from None
  if args.dtype not in (None, "bfloat16", "float32"):
    raise UserError(f"unknown --dtype {args.dtype!r} (bfloat16 | float32)")
  dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  model = Llama(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
  try:
    tok = load_tokenizer(cache_dir=args.cache_dir)
  except ckpt.CheckpointError as e:  # random weights need no tokenizer: token-id prompts only
    print(f"[serve] no tokenizer ({e}): prompts must be token ids, outputs carry no text", file=sys.stderr,
          flush=True)
    tok = None
  return cfg, model, tok, mesh, dtype, args.preset


def preset_names() -> list[str]:
  return sorted(PRESETS)


def warm_up(engine: Engine, log=None) -> None:
  """Compile the decode step and every prefill (or mixed-step) bucket before the first client waits on it.

  log(line): told each executable compiled and its seconds (compiles can take minutes on a busy GPU host)."""
  limit = min(engine.rt.max_seq_len, engine.cfg.max_position)
  vocab = engine.cfg.vocab_size
  compile_cache.compile_all(engine, log)  # every executable; then a prompt per bucket runs each once
  for i, b in enumerate(engine.rt.prefill_buckets):
    n = min(b, limit - 2)
    if n < 1:
      continue
    # Distinct token ids per bucket, so no warm-up prompt is a prefix-cache hit of another.
    rid = engine.add_request([(i * 7919 + j) % (vocab - 3) + 3 for j in range(n)],
                             SamplingParams(max_new_tokens=2, ignore_eos=True))
    while engine.output(rid).finish_reason is None:
      engine.step()
    _forget(engine, rid)


class Overloaded(Exception):
  """The request queue is full (the server answers 429)."""


@dataclasses.dataclass
class Event:
  """What a request's stream receives: new token ids, then once a finish reason (or an error)."""

  token_ids: list[int]
  finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"
  error: str | None = None  # the engine refused the request (RequestError)
  param: str | None = None  # the request field the refusal names, if any


class Handle:
  """One request as the server sees it: its event queue lives on the server's event loop."""

  def __init__(self, prompt_ids: list[int], sampling: SamplingParams):
    self.prompt_ids, self.sampling = prompt_ids, sampling
    self.events: asyncio.Queue[Event] = asyncio.Queue()
    self._loop = asyncio.get_running_loop()
    self.rid: int | None = None
    self.submitted = time.perf_counter()
    self.last_token: float | None = None
    self.num_tokens = 0
    self.done = False



_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort"}


class EngineLoop:
  """Runs `engine.step()` in a thread while there is work; admits and aborts between steps.

  At most `max_slots + max_queue` requests are in flight: `submit` raises `Overloaded` beyond that.
  `metrics` (kvrm_jax.serve.metrics.Metrics or None) is updated from the engine thread.
  """

  def __init__(self, engine: Engine, *, max_queue: int, metrics=None):
    self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
    cfg, rt = engine.cfg, engine.rt
    self.context_limit = min(rt.max_seq_len, cfg.max_position)  # prompt + output tokens per request
    self.vocab_size = cfg.vocab_size
    self.capacity = rt.max_slots + max_queue
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._handles: dict[int, Handle] = {}
    self._outbox: list[tuple[Handle, Event]] = []  # events of this iteration, delivered together
    self._lock = threading.Lock()
    self._in_flight = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="kvrm-engine", daemon=True)
    self.error: BaseException | None = None  # what killed the engine thread, if anything
    engine.stats.take_series()  # warm-up steps are not served steps
    if metrics is not None:
      metrics.set_baseline(self.snapshot())  # counters count from here (warm-up excluded)

  # ------------------------------------------------------------------ server side (event loop thread)

  @property
  def in_flight(self) -> int:
    return self._in_flight

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def start(self) -> None:
    self._thread.start()

  def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> Handle:
    """Queue a request; its first event says whether the engine took it (error None) or not."""
    with self._lock:
      if self._in_flight >= self.capacity:
        raise Overloaded(f"{self._in_flight} requests in flight (--max-slots {self.engine.rt.max_slots} + "
                         f"--max-queue {self.max_queue}); retry later")
      self._in_flight += 1
    h = Handle(prompt_ids, sampling)
    self._inbox.put(("add", h))
    return h

  def abort(self, h: Handle) -> None:
    """Stop a request (its client went away); its blocks are freed before the next step."""
    if not h.done:
      self._inbox.put(("abort", h))

  def abort_all(self) -> None:
    """Abort every request in flight (shutdown): each stream ends with finish_reason 'abort'."""
    self._inbox.put(("abort_all", None))

  def drain(self, timeout: float) -> bool:
    """Wait up to `timeout` s for the requests in flight to finish, then abort the rest; True if
    none was left by then (call it once new requests are refused)."""
    deadline = time.monotonic() + timeout
    while self._in_flight and time.monotonic() < deadline and self._thread.is_alive():
      time.sleep(0.02)
    clean = not self._in_flight
    if not clean:
      self.abort_all()
      end = time.monotonic() + 5.0
      while self._in_flight and time.monotonic() < end and self._thread.is_alive():
        time.sleep(0.02)
    return clean

  def stop(self, timeout: float) -> None:
    """Abort what is left, end the thread and wait for it (at most `timeout` seconds)."""
    self._stop.set()
    self._inbox.put(("wake", None))
    if self._thread.is_alive():
      self._thread.join(timeout)

  # ------------------------------------------------------------------ engine thread

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        self._drain(block=not self.engine.has_work())
        if self.engine.has_work() and not self._stop.is_set():
          events = self.engine.step()
          self._dispatch(events)
        self._flush()
        series = self.engine.stats.take_series()  # the metrics' per-step values; nothing kept here
        if self.metrics is not None:
          self.metrics.observe_engine(self, series)
    except BaseException as e:  # noqa: BLE001  (reported by /health; every waiting client gets an error)
      self.error = e
      raise
    finally:
      self._stop.set()  # requests still in the inbox are refused
      self._drain(block=False)
      for h in list(self._handles.values()):
        try:
          self._abort(h)
        except Exception:  # noqa: BLE001  (the engine itself failed: end the stream all the same)
          self._handles.pop(h.rid, None)
          self._end(h, Event([], finish_reason="abort"))
      self._flush()

  def _drain(self, block: bool) -> None:
    try:
      item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      kind, h = item
      if kind == "add":
        self._add(h)
      elif kind == "abort":
        self._abort(h)
      elif kind == "abort_all":
        for x in list(self._handles.values()):
          self._abort(x)
      try:
        item = self._inbox.get_nowait()
      except queue.Empty:
        return

  def _add(self, h: Handle) -> None:
    if self._stop.is_set():
      self._end(h, Event([], error="the server is shutting down"))
      return
    try:
      h.rid = self.engine.add_request(h.prompt_ids, h.sampling, arrival=h.submitted)
    except RequestError as e:
      self._end(h, Event([], error=str(e), param=e.param))
      return
    self._handles[h.rid] = h
    self._outbox.append((h, Event([])))  # accepted
    if self.metrics is not None:
      self.metrics.prompt_tokens.inc(len(h.prompt_ids))

  def _abort(self, h: Handle) -> None:
    if h.done or h.rid is None:
      return
    self.engine.abort(h.rid)
    self._finish(h, "aborted", [])

  def _dispatch(self, events: dict[int, list[int]]) -> None:
    now = time.perf_counter()
    batch = [(rid, h, ids) for rid, ids in events.items() if (h := self._handles.get(rid)) is not None]
    if self.metrics is not None:  # one call per step: per-token observations cost 0.6 ms at 148 streams
      self.metrics.observe_tokens([(h, len(ids)) for _, h, ids in batch], now)
    for rid, h, ids in batch:
      h.num_tokens += len(ids)
      h.last_token = now
      reason = _finish_reason(self.engine, rid)
      if reason is None:
        self._outbox.append((h, Event(ids)))
      else:
        self._finish(h, reason, ids)

  def _finish(self, h: Handle, reason: str, ids: list[int]) -> None:
    self._handles.pop(h.rid, None)
    _forget(self.engine, h.rid)
    if self.metrics is not None:
      self.metrics.observe_finish(h, _REASONS[reason])
    self._end(h, Event(ids, finish_reason=_REASONS[reason]))

  def _end(self, h: Handle, ev: Event) -> None:
    h.done = True
    with self._lock:
      self._in_flight -= 1
    self._outbox.append((h, ev))

  def _flush(self) -> None:
    if not self._outbox:
      return
    by_loop: dict = {}
    for h, ev in self._outbox:
      by_loop.setdefault(h._loop, []).append((h, ev))
    self._outbox = []
    for aloop, batch in by_loop.items():
      try:
        aloop.call_soon_threadsafe(_deliver, batch)
      except RuntimeError:  # that event loop has closed (shutdown): nobody is listening any more
        pass

  # ------------------------------------------------------------------ engine state for the metrics

  def snapshot(self) -> dict:
    """Engine counters for the metrics (read on the engine thread)."""
    eng = self.engine
    waiting = len(eng.sched.waiting)
    return {"queued": waiting, "running": len(self._handles) - waiting,
            "blocks_used": eng.sched.allocator.num_used_blocks, "blocks_free": eng.sched.allocator.num_free_blocks,
            "preemptions": eng.stats.preemptions, "prefix_hit_blocks": eng.stats.prefix_hit_blocks,
            "decode_steps": eng.stats.decode_steps, "pipelined_steps": eng.stats.pipelined_steps,
            "mixed_steps": eng.stats.mixed_steps}


def _deliver(batch: list[tuple[Handle, Event]]) -> None:
  for h, ev in batch:
    h.events.put_nowait(ev)


def _finish_reason(engine: Engine, rid: int) -> str | None:
  # engine.output(rid) would also decode the whole text: O(tokens) per token per request.
  return engine.requests[rid].finish_reason


def _forget(engine: Engine, rid: int) -> None:
  # A finished request's host record is no longer needed; a long-running server must not keep it.
  engine.requests.pop(rid, None)
