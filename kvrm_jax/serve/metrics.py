"""Prometheus metrics of the server (`/metrics`), in their own registry.

Engine-side values (queue, running, KV blocks, preemptions, prefix-cache hits, latencies) come from
each engine iteration's report (kvrm_jax.serve.engine_loop.EngineCore.take), observed on the thread
that delivers its events; prometheus-client metrics are thread-safe.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5, 10, 20, 40, 80)
_HOST_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)


class BatchHistogram:
  """A histogram observed a batch at a time: the latencies of every stream of one engine step in
  one call (numpy bucket counts under a lock), exposed as prometheus-client's Histogram exposes
  its own (`_bucket{le=...}`, `_sum`, `_count`). Histogram.observe costs about 3.8 us a value,
  0.57 ms a step at 148 streams on the engine loop's critical path; a batch costs one call."""

  def __init__(self, name: str, documentation: str, buckets, registry: CollectorRegistry):
    self.name, self.documentation = name, documentation
    self.bounds = np.asarray(sorted(buckets), np.float64)
    self._counts = np.zeros(len(self.bounds) + 1, np.int64)  # the last: above every bound (+Inf)
    self._sum = 0.0
    self._lock = threading.Lock()
    registry.register(self)

  def observe(self, values) -> None:
    v = np.asarray(values, np.float64).ravel()
    if not v.size:
      return
    counts = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=len(self._counts))
    with self._lock:
      self._counts += counts
      self._sum += float(v.sum())

  def collect(self):
    with self._lock:
      cum, total = np.cumsum(self._counts), self._sum
    buckets = [(floatToGoString(b), int(c)) for b, c in zip(self.bounds, cum[:-1])] + [("+Inf", int(cum[-1]))]
    yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)

  def describe(self):
    return list(self.collect())


class Metrics:
  """All metrics of one server."""

  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.queued = Gauge("kvrm_queued_requests", "Requests waiting for a decode slot", registry=r)
    self.running = Gauge("kvrm_running_requests", "Requests in decode slots (prefilling or decoding)", registry=r)
    self.blocks_used = Gauge("kvrm_kv_blocks_used", "KV pool blocks in use", registry=r)
    self.blocks_free = Gauge("kvrm_kv_blocks_free", "KV pool blocks free (evictable prefix-cache blocks included)",
                             registry=r)
    self.tokens_per_s = Gauge("kvrm_generation_tokens_per_second", "Generated tokens per second over the last "
                              "second of engine time", registry=r)
    self.prompt_tokens = Counter("kvrm_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
    self.generation_tokens = Counter("kvrm_generation_tokens", "Generated tokens", registry=r)
    self.preemptions = Counter("kvrm_preemptions", "Requests preempted by the engine", registry=r)
    self.prefix_hits = Counter("kvrm_prefix_cache_hit_blocks", "Prompt KV blocks served from the prefix cache",
                               registry=r)
    self.requests = Counter("kvrm_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
    self.rejected = Counter("kvrm_rejected_requests", "Requests refused before reaching the engine, by cause",
                            ["cause"], registry=r)
    self.ttft = BatchHistogram("kvrm_time_to_first_token_seconds", "Request arrival to its first token",
                               _LATENCY_BUCKETS, r)
    self.itl = BatchHistogram("kvrm_inter_token_latency_seconds", "Gap between consecutive token events of a "
                              "request", _LATENCY_BUCKETS, r)
    self.e2e = BatchHistogram("kvrm_e2e_request_latency_seconds", "Request arrival to its last token",
                              _LATENCY_BUCKETS, r)
    self.step_time = BatchHistogram("kvrm_engine_step_seconds", "Engine step, dispatch to its tokens on the host",
                                    _LATENCY_BUCKETS, r)
    self.step_host = BatchHistogram("kvrm_engine_step_host_seconds", "Host time of an engine step (scheduling, "
                                    "descriptors, dispatch; the GPU's time excluded)", _HOST_BUCKETS, r)
    self.steps = Counter("kvrm_engine_steps", "Engine steps: decode (every step with decode rows), pipelined "
                         "(those dispatched before the previous step's tokens were read), mixed (steps with "
                         "prompt tiles, --step-tokens)", ["kind"], registry=r)
    self._last = {"preemptions": 0, "prefix_hit_blocks": 0, "decode_steps": 0, "pipelined_steps": 0,
                  "mixed_steps": 0}
    self._window_start, self._window_tokens = time.perf_counter(), 0

  def set_baseline(self, snapshot: dict) -> None:
    """Engine counters before serving (warm-up) are not counted."""
    self._last = {k: snapshot[k] for k in self._last}

  def render(self) -> bytes:
    return generate_latest(self.registry)

  def observe(self, report: dict) -> None:
    """One engine iteration's report (EngineCore.take): the latencies of its token events and
    finished requests, its step times (EngineStats.take_series) and the engine's counters after it."""
    self.ttft.observe(report["ttft"])
    self.itl.observe(report["itl"])
    self.e2e.observe(report["e2e"])
    self.generation_tokens.inc(report["tokens"])
    self.prompt_tokens.inc(report["prompt_tokens"])
    self._window_tokens += report["tokens"]
    for reason in report["finished"]:
      self.requests.labels(reason).inc()
    series = report["series"]
    if series:
      self.step_time.observe(series["step_s"])
      self.step_host.observe(np.asarray(series["host_us"], np.float64) * 1e-6)
    s = report["snapshot"]
    self.queued.set(s["queued"])
    self.running.set(s["running"])
    self.blocks_used.set(s["blocks_used"])
    self.blocks_free.set(s["blocks_free"])
    for key, counter in (("preemptions", self.preemptions), ("prefix_hit_blocks", self.prefix_hits)):
      counter.inc(s[key] - self._last[key])
      self._last[key] = s[key]
    for key in ("decode_steps", "pipelined_steps", "mixed_steps"):
      self.steps.labels(key.removesuffix("_steps")).inc(s[key] - self._last[key])
      self._last[key] = s[key]
    now = time.perf_counter()
    if now - self._window_start >= 1.0:
      self.tokens_per_s.set(self._window_tokens / (now - self._window_start))
      self._window_start, self._window_tokens = now, 0
