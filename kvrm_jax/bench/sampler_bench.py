"""The decode step's sampler alone: what each route costs at a decode batch over a real vocabulary.

A step's sampler reads its [B, V] logits several times (argmax, the top-k window, the threshold
searches, the Gumbel draw). This times `kvrm_jax.step.sampling.sample` by itself, jitted, on
random logits of B rows and the model's vocabulary, for each setting of the rows:

  greedy     temperature 0
  k50-p0.9   temperature 0.8, top-k 50, top-p 0.9   (the top-k window route)
  p0.9       temperature 0.8, top-p 0.9, no top-k     (top-p by a search over V)
  k1000      temperature 0.8, top-k 1,000             (top-k by a search over V)

and each sampler the steps can compile:

  greedy-only  the argmax alone (RuntimeConfig.greedy_only): the floor
  branch       `lax.cond` around the stochastic path and each search (a bisection)
  branch-free  every route always runs (RuntimeConfig.sampler "branch-free"), its searches with
               each of --ways (cut points per round + 1; 2 is a bisection)
  window       the top-k window route only, no search, no branch (RuntimeConfig.sampler "window":
               at most the 64 most likely tokens; not timed for k1000, which it refuses)

Method: --calls calls back to back, then one wait, divided by --calls; the median of --reps such
timings. It reports ms per call, the logits' bytes over that time as a multiple of one pass at the
copy bandwidth measured in the same run ("passes": what the sampler costs in reads of its input),
and checks that every branch-free `ways` draws the branching sampler's tokens, and "window" too
where the two definitions agree (greedy, k50-p0.9; for p0.9 the window cuts wider nuclei).

    python scripts/bench_sampler.py --out-json sampler.json
    python scripts/bench_sampler.py --rows 32 148 256 --ways 2 4 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax import bench as bc
from kvrm_jax.config import ModelConfig
from kvrm_jax.bench.step_bench import copy_bandwidth
from kvrm_jax.step import sampling

SETTINGS = {  # name -> (temperature, top_k, top_p)
    "greedy": (0.0, 0, 1.0),
    "k50-p0.9": (0.8, 50, 0.9),
    "p0.9": (0.8, 0, 0.9),
    "k1000": (0.8, 1000, 1.0),
}


def time_call(fn, args, calls: int, reps: int) -> float:
  """Median over reps of (calls back to back, one wait) / calls, in ms."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / calls)
  return 1e3 * float(np.median(ts))


def samplers(ways: list[int]) -> dict:
  """name -> keyword arguments of `sampling.sample`."""
  out = {"greedy-only": dict(greedy_only=True), "branch": {}}
  for w in ways:
    out[f"branch-free ({w}-way)"] = dict(branch_free=True, ways=w)
  out["window"] = dict(window=True)
  return out


WINDOW_AGREES = ("greedy", "k50-p0.9")  # settings where sampler "window" draws the same tokens
WINDOW_REFUSES = ("k1000",)


def run(rows: int, vocab: int, setting: str, kwargs: dict, calls: int, reps: int,
        seed: int = 0) -> tuple[float, np.ndarray]:
  """(ms per call, tokens) of `sample(**kwargs)` over `rows` random rows of `vocab` logits."""
  temp, k, p = SETTINGS[setting]
  logits = 3.0 * jax.random.normal(jax.random.key(seed), (rows, vocab), jnp.float32)
  args = (logits, jnp.full((rows,), temp, jnp.float32), jnp.full((rows,), k, jnp.int32),
          jnp.full((rows,), p, jnp.float32), jnp.arange(rows, dtype=jnp.int32), jnp.arange(rows, dtype=jnp.int32))
  fn = jax.jit(lambda *a: sampling.sample(*a, **kwargs))
  return time_call(fn, args, calls, reps), np.asarray(fn(*args))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama3-8b", help="the model preset whose vocabulary is used")
  p.add_argument("--rows", type=int, nargs="+", default=[148], help="batch rows B")
  p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  p.add_argument("--ways", type=int, nargs="+", default=[2, 4, 16],
                 help=f"branch-free search ways to time (default 2 4 16; the steps use {sampling.BRANCH_FREE_WAYS})")
  p.add_argument("--calls", type=int, default=20, help="calls back to back per timing")
  p.add_argument("--reps", type=int, default=5, help="timings per row (median)")
  p.add_argument("--out-json", help="rows and metadata")
  args = p.parse_args(argv)
  try:
    cfg = ModelConfig.from_name(args.model)
    bc.check_outputs(args.out_json)
  except (ValueError, bc.UserError) as e:
    p.error(str(e))
  if min(args.rows) < 1 or args.calls < 1 or args.reps < 1:
    p.error("--rows, --calls and --reps must be positive")
  bad = [w for w in args.ways if w < 2 or w & (w - 1)]
  if bad:
    p.error(f"--ways must be powers of two >= 2, got {bad}")
  bw = copy_bandwidth()
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": args.model,
          "vocab": cfg.vocab_size, "copy_tb_s": bw,
          "command": "python scripts/bench_sampler.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  out = []
  print("| rows | setting | sampler | ms per call | passes over the logits | same tokens as branch |")
  print("| --- | --- | --- | --- | --- | --- |")
  for b in args.rows:
    for setting in args.settings:
      ref = None
      for name, kw in samplers(args.ways).items():
        if name == "window" and setting in WINDOW_REFUSES:
          continue
        ms, tokens = run(b, cfg.vocab_size, setting, kw, args.calls, args.reps)
        if name == "branch":
          ref = tokens
        checked = name.startswith("branch-free") or (name == "window" and setting in WINDOW_AGREES)
        same = bool((tokens == ref).all()) if checked and ref is not None else None
        passes = ms / 1e3 * bw * 1e12 / (b * cfg.vocab_size * 4) if bw else None
        out.append({"rows": b, "setting": setting, "sampler": name, "ms": ms, "passes": passes, "same_tokens": same})
        print(f"| {b} | {setting} | {name} | {ms:.3f} | {'-' if passes is None else f'{passes:.1f}'} | "
              f"{'' if same is None else ('yes' if same else 'NO')} |", flush=True)
        if args.out_json:
          with open(args.out_json, "w") as f:
            json.dump({"meta": meta, "rows": out}, f, indent=1)
  return 1 if any(r["same_tokens"] is False for r in out) else 0
