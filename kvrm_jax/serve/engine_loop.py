"""The engine beside the server's event loop: in its own process (EngineProcess, the default) or
in a thread of the server's (EngineLoop).

Either way an EngineCore owns the engine: it admits and aborts requests between steps and hands
out each iteration's token events with a report for the metrics. The server side (`_Frontend`)
keeps one Handle per request; its events reach the request's asyncio queue, all events of one
iteration in one `loop.call_soon_threadsafe` call. The engine is never touched from any other
thread, so its compiled step stays one executable per shape and its host state needs no lock. In
its own process the engine's host work does not wait on the interpreter lock the HTTP streams
hold (in a thread beside 148 streams its host time per step doubled: docs/results.md).

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

from kvrm_jax import compile_cache
from kvrm_jax.config import PRESETS, ModelConfig, RuntimeConfig
from kvrm_jax.model import checkpoint as ckpt
from kvrm_jax.model.llama import random_model
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
  model = random_model(cfg, jnp.dtype(dtype))
  try:
    tok = load_tokenizer(cache_dir=args.cache_dir)
  except ckpt.CheckpointError as e:  # random weights need no tokenizer: token-id prompts only
    print(f"[serve] no tokenizer ({e}): prompts must be token ids, outputs carry no text", file=sys.stderr,
          flush=True)
    tok = None
  return cfg, model, tok, mesh, dtype, args.preset


def preset_names() -> list[str]:
  return sorted(PRESETS)


def warm_up(engine: Engine, log=None, background: bool = False) -> None:
  """Compile the decode step and every prefill (or mixed-step) bucket before the first client waits on it
  (background: only those that can run every step; the others in a thread while the engine serves).

  log(line): told each executable compiled and its seconds (compiles can take minutes on a busy GPU host)."""
  limit = min(engine.rt.max_seq_len, engine.cfg.max_position)
  vocab = engine.cfg.vocab_size
  compile_cache.compile_all(engine, log, background=background)  # then a prompt per bucket runs each once
  t0 = time.perf_counter()
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
  if log is not None:
    log(f"warm-up requests ran in {time.perf_counter() - t0:.1f} s")


class Overloaded(Exception):
  """The request queue is full (the server answers 429)."""


@dataclasses.dataclass
class Event:
  """What a request's stream receives: new token ids, then once a finish reason (or an error)."""

  token_ids: list[int]
  finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"
  error: str | None = None  # the engine refused the request (RequestError)
  param: str | None = None  # the request field the refusal names, if any

  @property
  def final(self) -> bool:
    return self.finish_reason is not None or self.error is not None


class Handle:
  """One request as the server sees it: its event queue lives on the server's event loop."""

  def __init__(self, hid: int, prompt_ids: list[int], sampling: SamplingParams):
    self.hid, self.prompt_ids, self.sampling = hid, prompt_ids, sampling
    self.events: asyncio.Queue[Event] = asyncio.Queue()
    self._loop = asyncio.get_running_loop()
    self.submitted = time.perf_counter()
    self.done = False


_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort"}


class _Req:
  """A request on the engine's side of the loop."""

  __slots__ = ("hid", "rid", "submitted", "last_token")

  def __init__(self, hid: int, rid: int, submitted: float):
    self.hid, self.rid, self.submitted, self.last_token = hid, rid, submitted, None


class EngineCore:
  """The engine's side of the serving loop, the same in the engine thread and the engine process:
  admits and aborts requests between steps, steps while there is work, and hands out each
  iteration's events `[(handle id, Event)]` with a report for the metrics (`take`). The engine is
  never touched from any other thread, so its compiled step stays one executable per shape and its
  host state needs no lock."""

  def __init__(self, engine: Engine):
    self.engine = engine
    self.reqs: dict[int, _Req] = {}  # by engine request id
    self._rids: dict[int, int] = {}  # engine request id by handle id
    self.stopping = False
    self._out: list[tuple[int, Event]] = []
    self._report = _new_report()
    engine.stats.take_series()  # warm-up steps are not served steps

  def command(self, cmd: tuple) -> None:
    """("add", hid, prompt_ids, sampling, submitted) | ("abort", hid) | ("abort_all",)."""
    kind = cmd[0]
    if kind == "add":
      self._add(*cmd[1:])
    elif kind == "abort":
      req = self.reqs.get(self._rids.get(cmd[1], -1))
      if req is not None:
        self._abort(req)
    elif kind == "abort_all":
      self.abort_all()

  def iterate(self) -> None:
    """One engine step if there is work; its events join this iteration's."""
    if self.engine.has_work() and not self.stopping:
      self._dispatch(self.engine.step())

  def take(self) -> tuple[list[tuple[int, Event]], dict]:
    """This iteration's events and metrics report (then emptied)."""
    self._report["series"] = self.engine.stats.take_series()
    self._report["snapshot"] = self.snapshot()
    out, report = self._out, self._report
    self._out, self._report = [], _new_report()
    return out, report

  def abort_all(self) -> None:
    for r in list(self.reqs.values()):
      self._abort(r)

  def fail_all(self) -> None:
    """The engine itself failed: end every stream all the same."""
    for r in list(self.reqs.values()):
      try:
        self._abort(r)
      except Exception:  # noqa: BLE001
        self.reqs.pop(r.rid, None)
        self._rids.pop(r.hid, None)
        self._out.append((r.hid, Event([], finish_reason="abort")))

  def snapshot(self) -> dict:
    """Engine counters for the metrics."""
    eng = self.engine
    waiting = len(eng.sched.waiting)
    return {"queued": waiting, "running": len(self.reqs) - waiting,
            "blocks_used": eng.sched.allocator.num_used_blocks, "blocks_free": eng.sched.allocator.num_free_blocks,
            "preemptions": eng.stats.preemptions, "prefix_hit_blocks": eng.stats.prefix_hit_blocks,
            "decode_steps": eng.stats.decode_steps, "pipelined_steps": eng.stats.pipelined_steps,
            "mixed_steps": eng.stats.mixed_steps}

  def _add(self, hid: int, prompt_ids: list[int], sampling: SamplingParams, submitted: float) -> None:
    if self.stopping:
      self._out.append((hid, Event([], error="the server is shutting down")))
      return
    try:
      rid = self.engine.add_request(prompt_ids, sampling, arrival=submitted)
    except RequestError as e:
      self._out.append((hid, Event([], error=str(e), param=e.param)))
      return
    self.reqs[rid] = _Req(hid, rid, submitted)
    self._rids[hid] = rid
    self._out.append((hid, Event([])))  # accepted
    self._report["prompt_tokens"] += len(prompt_ids)

  def _abort(self, r: _Req) -> None:
    self.engine.abort(r.rid)
    self._finish(r, "aborted", [])

  def _dispatch(self, events: dict[int, list[int]]) -> None:
    now = time.perf_counter()
    rep = self._report
    for rid, ids in events.items():
      r = self.reqs.get(rid)
      if r is None:
        continue
      if r.last_token is None:
        rep["ttft"].append(now - r.submitted)
      else:
        rep["itl"].append(now - r.last_token)
      rep["tokens"] += len(ids)
      r.last_token = now
      # engine.output(rid) would also decode the whole text: O(tokens) per token per request.
      reason = self.engine.requests[rid].finish_reason
      if reason is None:
        self._out.append((r.hid, Event(ids)))
      else:
        self._finish(r, reason, ids)

  def _finish(self, r: _Req, reason: str, ids: list[int]) -> None:
    self.reqs.pop(r.rid, None)
    self._rids.pop(r.hid, None)
    _forget(self.engine, r.rid)
    self._report["finished"].append(_REASONS[reason])
    if r.last_token is not None:
      self._report["e2e"].append(r.last_token - r.submitted)
    self._out.append((r.hid, Event(ids, finish_reason=_REASONS[reason])))


def _forget(engine: Engine, rid: int) -> None:
  # A finished request's host record is no longer needed; a long-running server must not keep it.
  engine.requests.pop(rid, None)


def _new_report() -> dict:
  return {"ttft": [], "itl": [], "e2e": [], "tokens": 0, "prompt_tokens": 0, "finished": []}


class _Frontend:
  """The server's side: request handles, the in-flight count and delivery of each iteration's events
  to the handles' event loops. Subclasses carry commands to an EngineCore and its output back."""

  rt: RuntimeConfig
  context_limit: int
  vocab_size: int
  error: BaseException | str | None = None

  def _init_frontend(self, rt: RuntimeConfig, vocab_size: int, max_position: int, max_queue: int, metrics) -> None:
    self.rt, self.vocab_size, self.max_queue, self.metrics = rt, vocab_size, max_queue, metrics
    self.context_limit = min(rt.max_seq_len, max_position)  # prompt + output tokens per request
    self.capacity = rt.max_slots + max_queue
    self._handles: dict[int, Handle] = {}
    self._lock = threading.Lock()
    self._next_hid = 0
    self._in_flight = 0
    self._stop = threading.Event()

  @property
  def in_flight(self) -> int:
    return self._in_flight

  def submit(self, prompt_ids: list[int], sampling: SamplingParams) -> Handle:
    """Queue a request; its first event says whether the engine took it (error None) or not."""
    with self._lock:
      if self._in_flight >= self.capacity:
        raise Overloaded(f"{self._in_flight} requests in flight (--max-slots {self.rt.max_slots} + "
                         f"--max-queue {self.max_queue}); retry later")
      hid, self._next_hid = self._next_hid, self._next_hid + 1
      h = Handle(hid, prompt_ids, sampling)
      if self._stop.is_set():  # stopping or dead: nothing would ever answer it
        h.done = True
        h.events.put_nowait(Event([], error=f"the engine loop is not running ({self.error or 'shutting down'})"))
        return h
      self._in_flight += 1
      self._handles[hid] = h
    self._send(("add", hid, prompt_ids, sampling, h.submitted))
    return h

  def abort(self, h: Handle) -> None:
    """Stop a request (its client went away); its blocks are freed before the next step."""
    if not h.done:
      self._send(("abort", h.hid))

  def abort_all(self) -> None:
    """Abort every request in flight (shutdown): each stream ends with finish_reason 'abort'."""
    self._send(("abort_all",))

  def drain(self, timeout: float) -> bool:
    """Wait up to `timeout` s for the requests in flight to finish, then abort the rest; True if
    none was left by then (call it once new requests are refused)."""
    deadline = time.monotonic() + timeout
    while self._in_flight and time.monotonic() < deadline and self.alive:
      time.sleep(0.02)
    clean = not self._in_flight
    if not clean:
      self.abort_all()
      end = time.monotonic() + 5.0
      while self._in_flight and time.monotonic() < end and self.alive:
        time.sleep(0.02)
    return clean

  def _deliver(self, out: list[tuple[int, Event]], report: dict | None) -> None:
    """One iteration's events to their streams (one call_soon_threadsafe per event loop), and its
    report to the metrics."""
    if self.metrics is not None and report is not None:
      self.metrics.observe(report)
    if not out:
      return
    by_loop: dict = {}
    with self._lock:
      for hid, ev in out:
        h = self._handles.get(hid)
        if h is None:
          continue
        if ev.final:
          del self._handles[hid]
          h.done = True
          self._in_flight -= 1
        by_loop.setdefault(h._loop, []).append((h, ev))
    for aloop, batch in by_loop.items():
      try:
        aloop.call_soon_threadsafe(_put_events, batch)
      except RuntimeError:  # that event loop has closed (shutdown): nobody is listening any more
        pass

  def _end_all(self, reason: str = "abort") -> None:
    """The engine is gone: end every stream still open."""
    with self._lock:
      hids = list(self._handles)
    self._deliver([(hid, Event([], finish_reason=reason)) for hid in hids], None)


def _put_events(batch: list[tuple[Handle, Event]]) -> None:
  for h, ev in batch:
    h.events.put_nowait(ev)


class EngineLoop(_Frontend):
  """The engine in a thread beside the server's event loop (`--engine-thread`, and apps built
  in-process on an Engine): commands enter through a thread-safe inbox; each iteration's events go
  to the event loop in one `call_soon_threadsafe` call per loop. At most `max_slots + max_queue`
  requests are in flight: `submit` raises `Overloaded` beyond that. `metrics`
  (kvrm_jax.serve.metrics.Metrics or None) is fed each iteration's report."""

  def __init__(self, engine: Engine, *, max_queue: int, metrics=None):
    self.engine = engine
    self._init_frontend(engine.rt, engine.cfg.vocab_size, engine.cfg.max_position, max_queue, metrics)
    self.core = EngineCore(engine)
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._thread = threading.Thread(target=self._run, name="kvrm-engine", daemon=True)
    if metrics is not None:
      metrics.set_baseline(self.core.snapshot())  # counters count from here (warm-up excluded)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float) -> None:
    """Abort what is left, end the thread and wait for it (at most `timeout` seconds)."""
    self._stop.set()
    self._inbox.put(("wake",))
    if self._thread.is_alive():
      self._thread.join(timeout)

  def _send(self, cmd: tuple) -> None:
    self._inbox.put(cmd)

  def _run(self) -> None:
    core = self.core
    try:
      while not self._stop.is_set():
        self._take_commands(block=not core.engine.has_work())
        if not self._stop.is_set():
          core.iterate()
        self._deliver(*core.take())
    except BaseException as e:  # noqa: BLE001  (reported by /health; every waiting client gets an error)
      self.error = e
      raise
    finally:
      self._stop.set()
      core.stopping = True  # requests still in the inbox are refused
      self._take_commands(block=False)
      core.fail_all()
      self._deliver(*core.take())

  def _take_commands(self, block: bool) -> None:
    try:
      cmd = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      self.core.command(cmd)
      try:
        cmd = self._inbox.get_nowait()
      except queue.Empty:
        return


class EngineProcess(_Frontend):
  """The engine in its own process (the server's default): the server's event loop, its streams
  and the engine's host work each hold their own interpreter lock, as vLLM's engine core does.

  `build(args, log)` runs in the child (spawned, so the parent never touches the accelerator) and
  returns (engine, tokenizer, name, dtype), the engine ready to serve (warmed up if wanted).
  `spawned`: a process `kvrm_jax.serve.spawn.spawn()` started earlier (the server starts it before
  its own imports); default: one started here. Commands go down one pipe; each iteration's events
  and metrics report come back up it, read by a thread of this process. Construction returns once
  the engine is ready (UserError if it failed).
  """

  def __init__(self, build, args, *, max_queue: int, metrics=None, log=None, spawned=None):
    from kvrm_jax.serve import spawn
    spawned = spawned or spawn.spawn()
    self._proc, self._conn = spawned.proc, spawned.conn
    spawn.send_build(spawned, build, args)
    # Commands go out through a thread of their own: a burst of long prompts can fill the pipe while
    # the engine is inside a step, and the event loop must not wait for it.
    self._outbox: queue.SimpleQueue = queue.SimpleQueue()
    self._sender = threading.Thread(target=self._send_loop, name="kvrm-engine-sender", daemon=True)
    self._log = log = log or (lambda line: None)
    while True:
      try:
        msg = self._conn.recv()
      except EOFError:
        self._proc.join(5)
        raise UserError(f"the engine process exited during start-up (exit code {self._proc.exitcode})") from None
      if msg[0] == "log":
        log(msg[1])
      elif msg[0] == "failed":
        self._proc.join(5)
        raise UserError(msg[1])
      else:  # ("ready", info)
        break
    info = msg[1]
    self.kind, self.tokenizer, self.name, self.dtype = info["kind"], info["tokenizer"], info["name"], info["dtype"]
    self._init_frontend(info["rt"], info["vocab_size"], info["max_position"], max_queue, metrics)
    if metrics is not None:
      metrics.set_baseline(info["snapshot"])
    self._reader = threading.Thread(target=self._read, name="kvrm-engine-reader", daemon=True)

  @property
  def alive(self) -> bool:
    return self._reader.is_alive() and not self._stop.is_set()

  def start(self) -> None:
    self._reader.start()
    self._sender.start()

  def stop(self, timeout: float) -> None:
    """Abort what is left, end the engine process and wait for it (at most `timeout` seconds)."""
    self._stop.set()
    self._send(("stop",))
    if self._reader.is_alive():
      self._reader.join(timeout)
    self._proc.join(max(timeout, 1.0))
    if self._proc.is_alive():
      self._proc.terminate()
      self._proc.join(5)

  def _send(self, cmd: tuple) -> None:
    self._outbox.put(cmd)

  def _send_loop(self) -> None:
    while True:
      cmd = self._outbox.get()
      try:
        self._conn.send(cmd)
      except (OSError, ValueError):  # the engine process is gone: the reader ends every stream
        return
      if cmd[0] == "stop":
        return

  def _read(self) -> None:
    try:
      while True:
        msg = self._conn.recv()
        if msg[0] == "out":
          self._deliver(msg[1], msg[2])
        elif msg[0] == "log":  # compiles still running in the background
          self._log(msg[1])
        elif msg[0] == "error":
          self.error = msg[1]
        elif msg[0] == "stopped":
          return
    except (EOFError, OSError):
      if self.error is None:
        self.error = f"the engine process exited (exit code {self._proc.exitcode})"
    finally:
      self._stop.set()
      self._end_all()


def engine_main(conn, build, args) -> None:
  """The engine process (after `kvrm_jax.serve.spawn`'s start): build and warm up, report ready,
  then serve commands until told to stop or the server's end of the pipe closes."""
  import signal
  # The server process handles SIGINT/SIGTERM (drain, then "stop"); a terminal's Ctrl-C reaches the
  # whole process group, and the engine must outlive it until the drain is over.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  lock = threading.Lock()  # background compiles log from threads of their own

  def send(msg) -> None:
    with lock:
      conn.send(msg)

  try:
    log = lambda line: send(("log", line))  # noqa: E731
    engine, tok, name, dtype = build(args, log)
    core = EngineCore(engine)
    send(("ready", {"rt": engine.rt, "vocab_size": engine.cfg.vocab_size,
                    "max_position": engine.cfg.max_position, "kind": engine.kind, "tokenizer": tok,
                    "name": name, "dtype": str(dtype), "snapshot": core.snapshot()}))
  except Exception as e:  # noqa: BLE001  (the server reports it in one line and exits)
    try:
      send(("failed", str(e) if isinstance(e, (UserError, ValueError, OSError)) else f"{type(e).__name__}: {e}"))
    except OSError:  # the server is gone (killed during start-up): no one to tell, end quietly
      pass
    return
  stop = False
  try:
    while not stop:
      if conn.poll(0 if core.engine.has_work() else 0.1):
        while True:
          try:
            cmd = conn.recv()
          except EOFError:  # the server is gone
            return
          if cmd[0] == "stop":
            stop = True
            core.abort_all()
          else:
            core.command(cmd)
          if not conn.poll(0):
            break
      if not stop:
        core.iterate()
      out, report = core.take()
      if out or report["series"]["step_s"]:
        send(("out", out, report))
  except BaseException as e:  # noqa: BLE001  (reported by /health; every waiting client's stream ends)
    core.stopping = True
    core.fail_all()
    try:
      send(("out", *core.take()))
      send(("error", f"{type(e).__name__}: {e}"))
    except (OSError, ValueError):
      pass
    raise
  send(("stopped",))
