"""The recording runner: wraps `engine.step()` with wall-clock timing and per-step records, and
slices the engine's cumulative stats into per-run metrics (latency percentiles, spikes, reserved /
live KV)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from tqdm import tqdm

from kvrm_jax import compile_cache
from kvrm_jax.bench.metrics import SPIKE_FACTOR, cdf, compact, pct, ratio_of
from kvrm_jax.sched.request import RequestError, SamplingParams

@dataclasses.dataclass
class Mark:
  """Where the engine's cumulative stats stood when a run started."""

  steps: int
  host_us: int
  step_s: int
  series: int
  groups: int
  moves: int
  preemptions: int
  prefix_hits: int
  decode_steps: int
  prefill_steps: int
  decode_compiles: int
  prefill_compiles: int  # executables of steps with prompt work: prefill and mixed
  prompt_tokens: int
  prompt_positions: int


class Runner:
  """Wraps an Engine: times each `step()` and records (start, seconds, decode batch, prefill ran, KV)."""

  def __init__(self, engine, kind: str, block_bytes: int):
    self.engine, self.kind, self.block_bytes = engine, kind, block_bytes
    self.token_bytes = block_bytes // engine.rt.block_size
    # One record per step: [start, seconds, decode batch, first tokens, prefill ran, reserved blocks, live tokens]
    self.steps: list[tuple] = []
    self.warmup_s = 0.0

  def step(self) -> dict:
    eng, st = self.engine, self.engine.stats
    p0, n0 = st.prefill_steps, len(st.reserved_series)
    t0 = time.perf_counter()
    events = eng.step()
    dt = time.perf_counter() - t0
    # A decode row emits its k-th token (k >= 2); a finished prompt emits its first.
    decoded = sum(1 for rid in events if len(eng.requests[rid].output_ids) >= 2)
    grew = len(st.reserved_series) > n0
    self.steps.append((t0, dt, decoded, len(events) - decoded, st.prefill_steps > p0,
                       st.reserved_series[-1] if grew else None, st.live_series[-1] if grew else None))
    return events

  def warmup(self, max_len: int, vocab: int, log=None) -> float:
    """Compile the decode step and every prefill (or mixed-step) bucket before anything is timed.

    log(line): told each executable compiled and its seconds (cold compiles of an 8B-shaped model
    take about a minute each on a GPU host); it stays set, so a compile during a timed run says so."""
    eng = self.engine
    t0 = time.perf_counter()
    compile_cache.compile_all(eng, log)  # every executable; then a prompt per bucket runs each once
    rng = np.random.default_rng(12345)
    for b in eng.rt.prefill_buckets:
      n = min(b, max_len - 2)
      if n < 1:
        continue
      rid = eng.add_request(rng.integers(3, vocab, n).tolist(), SamplingParams(max_new_tokens=2, ignore_eos=True))
      while not eng.requests[rid].done:
        eng.step()
    self.warmup_s = time.perf_counter() - t0
    return self.warmup_s

  def mark(self) -> Mark:
    st, c = self.engine.stats, self.engine.compiles
    return Mark(len(self.steps), len(st.host_us), len(st.step_s), len(st.reserved_series), len(st.groups_per_seq),
                st.moves, st.preemptions, st.prefix_hit_blocks, st.decode_steps, st.prefill_steps, c.decode,
                c.prefill + c.mixed, st.prompt_tokens, st.prompt_positions)

  def add(self, prompt, max_new_tokens: int, arrival: float, rids: list[int]) -> bool:
    """Queue one forced-length request (appended to rids); False if the engine rejects it."""
    try:
      rids.append(self.engine.add_request(prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
                                          arrival=arrival))
      return True
    except RequestError:
      return False

  def finish(self, rids: list[int], rejected: int, mark: Mark, t_start: float, t_end: float, **kw) -> dict:
    """metrics() of a run, then abort what it left unfinished (a run cut off by --max-wall must not
    leave work behind for the next run)."""
    m = self.metrics(rids, rejected, mark, t_start, t_end, **kw)
    for rid in rids:
      self.engine.abort(rid)
    return m

  def metrics(self, rids: list[int], rejected: int, mark: Mark, t_start: float, t_end: float, *,
              not_added: int = 0, series_points: int = 2000) -> dict:
    """Every metric of one run (the requests `rids` since `mark`), times relative to t_start.

    not_added: requests of the run never handed to the engine (a replay cut by --max-wall); they
    count as unfinished so that completed + rejected + unfinished == requests.
    """
    eng, st = self.engine, self.engine.stats
    reqs = [eng.requests[i] for i in rids]
    done = [r for r in reqs if r.finish_time is not None]
    gen = sum(len(r.output_ids) for r in reqs)
    wall = max(t_end - t_start, 1e-9)
    ttft = [(r.first_token_time - r.arrival) * 1e3 for r in reqs if r.first_token_time is not None]
    queue = [(r.admitted_time - r.arrival) * 1e3 for r in reqs if r.admitted_time is not None]
    itl = np.concatenate([np.diff(r.token_times) for r in reqs if len(r.token_times) > 1] or [np.zeros(0)]) * 1e3
    e2e = [(r.finish_time - r.arrival) * 1e3 for r in done]
    steps = self.steps[mark.steps:]
    dur = np.array([s[1] for s in steps]) * 1e3
    with_prompt = np.array([bool(s[4]) for s in steps], bool)
    prompt_tokens = sum(len(r.prompt_ids) for r in reqs if r.first_token_time is not None)
    med = float(np.median(dur)) if len(dur) else 0.0
    spikes = dur > SPIKE_FACTOR * med if len(dur) else np.zeros(0, bool)
    kv = [(s[0] - t_start, s[5] * self.block_bytes, s[6] * self.token_bytes) for s in steps if s[5] is not None]
    res = np.array([k[1] for k in kv], float)
    live = np.array([k[2] for k in kv], float)
    ratio = res[live > 0] / live[live > 0] if len(kv) else np.zeros(0)
    host = np.array(st.host_us[mark.host_us:], float)
    dev = np.array(st.step_s[mark.step_s:], float) * 1e3
    groups = st.groups_per_seq[mark.groups:]
    pt, pp = st.prompt_tokens - mark.prompt_tokens, st.prompt_positions - mark.prompt_positions
    return {
        "requests": len(reqs) + rejected + not_added, "completed": len(done), "rejected": rejected,
        "unfinished": len(reqs) - len(done) + not_added, "not_added": not_added,
        "generated_tokens": gen, "wall_s": wall, "tokens_per_s": gen / wall,
        "ttft_ms": pct(ttft, (50, 90, 99)), "queue_ms": pct(queue, (50, 99, 100)), "e2e_ms": pct(e2e, (50, 99)),
        "itl_ms": pct(itl, (50, 90, 99, 100)), "itl_p99_over_p50": ratio_of(pct(itl, (99,)), pct(itl, (50,))),
        "itl_cdf_ms": cdf(itl),
        "steps": len(steps), "prefill_steps": st.prefill_steps - mark.prefill_steps,
        "decode_steps": st.decode_steps - mark.decode_steps,
        "step_ms": dict(pct(dur, (50, 90, 99, 100)), mean=float(dur.mean()) if len(dur) else None),
        # steps with prompt work (a prefill call, or a mixed step) and decode-only steps
        "step_ms_with_prompt": pct(dur[with_prompt], (50, 99)), "step_ms_decode_only": pct(dur[~with_prompt], (50, 99)),
        "prompt_tokens": prompt_tokens, "prompt_tokens_per_s": prompt_tokens / wall,
        # prompt positions the steps computed (bucket padding included) against the prompt tokens in them
        "prompt_positions": {"tokens": pt, "positions": pp, "padding": 1 - pt / pp if pp else None},
        "decode_device_ms": {**pct(dev, (50, 99)), "mean": float(dev.mean()) if len(dev) else None},
        "spikes": {"threshold_ms": SPIKE_FACTOR * med, "count": int(spikes.sum()),
                   "fraction": float(spikes.mean()) if len(dur) else 0.0,
                   "max_over_median": float(dur.max() / med) if med > 0 else None,
                   "with_prefill": int(sum(1 for s, x in zip(steps, spikes) if x and s[4]))},
        "mean_decode_batch": float(np.mean([s[2] for s in steps if s[2]])) if any(s[2] for s in steps) else 0.0,
        "kv": {"peak_reserved_bytes": float(res.max()) if len(res) else 0.0,
               "peak_live_bytes": float(live.max()) if len(live) else 0.0,
               "peak_ratio": float(res.max() / live.max()) if len(live) and live.max() > 0 else None,
               "mean_ratio": float(ratio.mean()) if len(ratio) else None},
        "mean_groups_per_seq": float(np.mean(groups)) if groups else 0.0,
        "moves": st.moves - mark.moves, "preemptions": st.preemptions - mark.preemptions,
        "prefix_hit_blocks": st.prefix_hit_blocks - mark.prefix_hits,
        "host_us": {**pct(host, (50, 99)), "mean": float(host.mean()) if len(host) else None},
        "compiles_during_run": {"decode": eng.compiles.decode - mark.decode_compiles,
                                "prefill": eng.compiles.prefill + eng.compiles.mixed - mark.prefill_compiles},
        "series": {
            "steps": compact([[s[0] - t_start, s[1] * 1e3, s[2], int(s[4])] for s in steps], 1, series_points),
            "kv": compact([list(k) for k in kv], 1, series_points // 4),
        },
    }


def progress_bar(total: int, desc: str, quiet: bool):
  if quiet:
    return None
  return tqdm(total=total, desc=desc, unit="tok", leave=False, mininterval=1.0, dynamic_ncols=True,
              disable=None)  # None: only on a terminal
