#!/usr/bin/env python3
"""End-to-end decode step time against the roofline (weights + KV bytes over measured bandwidth).

B sequences of L tokens each are admitted straight into the pool (their KV is not computed: the
step's cost does not depend on the values), then the engine's own schedule -> descriptor ->
compiled decode step loop runs and each step is timed (dispatch to tokens on the host).

  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048
  python scripts/bench_step.py --model smollm2-135m --batches 64 --context 8192 --summaries sink=1,window=256,max=4

Writes JSON (--out-json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_bandwidth() -> float | None:
  """One large device-to-device copy, timed with CUDA events (bytes read + written), TB/s."""
  try:
    import torch
    if not torch.cuda.is_available():
      return None
  except ImportError:
    return None
  x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
  y = torch.empty_like(x)
  for _ in range(3):
    y.copy_(x)
  ts = []
  for _ in range(20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    y.copy_(x)
    b.record()
    torch.cuda.synchronize()
    ts.append(a.elapsed_time(b) / 1e3)
  del x, y
  torch.cuda.empty_cache()
  return 2 * (1 << 30) / float(np.median(ts)) / 1e12


def run_one(cfg, model, batch, context, args, summaries=None) -> dict:
  from kvrm_jax.config import RuntimeConfig
  from kvrm_jax.engine import Engine
  from kvrm_jax.sequence import SamplingParams

  bs = 16
  # With summaries, time only the steady state: once the prompt's far history has been folded.
  fold_steps = 0 if summaries is None else context // bs // max(1, summaries.max_entries) + 10
  steps = args.warmup + args.iters + fold_steps
  mb = -(-(context + steps + 2) // bs)
  rt = RuntimeConfig(block_size=bs, num_blocks=batch * (mb + 2) + 1, max_slots=batch, max_blocks_per_seq=mb,
                     prefill_buckets=(64,), dtype=args.dtype, attention=args.attention,
                     max_folds=4 * batch if summaries else 8)
  eng = Engine(cfg, model, rt, summaries=summaries)
  rng = np.random.default_rng(0)
  for _ in range(batch):
    eng.add_request(rng.integers(3, cfg.vocab_size, context).tolist(),
                    SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
  eng._admit()
  for req in list(eng.slots):  # stand in for the prefill: the prompts' KV is "computed"
    req.num_computed = req.prefill_target
    req.output_ids.append(int(rng.integers(3, cfg.vocab_size)))
    eng.mark_running(req)
  times, host = [], []
  folds_done_at = None
  for i in range(steps):
    t0 = time.perf_counter()
    plan = eng.schedule()
    ints, floats = eng.build_decode_descriptor(plan)
    t1 = time.perf_counter()
    tokens, eng.k_pool, eng.v_pool = eng.decode_step(eng.state, eng.k_pool, eng.v_pool, ints, floats)
    tok = np.asarray(tokens)
    t2 = time.perf_counter()
    eng.postprocess_decode(plan, tok, t2, {})
    if summaries is not None and not plan.folds and folds_done_at is None and i > 0:
      folds_done_at = i
    if i >= args.warmup and (summaries is None or folds_done_at is not None) and len(times) < args.iters:
      times.append(t2 - t0)
      host.append(t1 - t0)
  itemsize = 2 if args.dtype == "bfloat16" else 4
  tok_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
  exact_tokens = [r.num_computed - r.kv_offset for r in eng.slots]
  blocks = [len(eng.allocator.block_table(r.id)) + (1 if r.sum_base is not None else 0) for r in eng.slots]
  n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(eng.state))
  weight_bytes = n_params * itemsize
  kv_read = sum(exact_tokens) * tok_bytes
  return {"batch": batch, "context": context, "summaries": None if summaries is None else str(summaries),
          "step_ms_median": 1e3 * float(np.median(times)) if times else None, "steps_timed": len(times),
          "host_ms_median": 1e3 * float(np.median(host)) if host else None,
          "weight_bytes": weight_bytes, "kv_bytes_read": kv_read,
          "kv_bytes_per_seq": float(np.mean(blocks)) * bs * tok_bytes, "blocks_per_seq": float(np.mean(blocks)),
          "decode_compiles": eng.compiles.decode}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama3-8b")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--batches", type=int, nargs="+", default=[64, 128])
  p.add_argument("--context", type=int, nargs="+", default=[2048])
  p.add_argument("--summaries", nargs="*", default=[], help="also run with these summary settings")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--iters", type=int, default=30)
  p.add_argument("--attention", default="auto")
  p.add_argument("--out-json")
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from kvrm_jax.config import ModelConfig
  from kvrm_jax.model import Llama
  from kvrm_jax.summaries import SummaryConfig

  cfg = ModelConfig.from_name(args.model)
  model = Llama(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
  bw = copy_bandwidth()
  rows = []
  for ctx in args.context:
    for b in args.batches:
      for sc in [None] + [SummaryConfig.parse(s) for s in args.summaries]:
        r = run_one(cfg, model, b, ctx, args, sc)
        if bw and r["step_ms_median"]:
          r["roofline_ms"] = 1e3 * (r["weight_bytes"] + r["kv_bytes_read"]) / (bw * 1e12)
          r["vs_roofline"] = r["step_ms_median"] / r["roofline_ms"]
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": args.model, "dtype": args.dtype,
          "copy_tb_s": bw, "command": "python scripts/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  print(f"{meta['date']}, {meta['device']}, jax {meta['jax']}, {args.model} {args.dtype}, copy ceiling "
        f"{bw and round(bw, 2)} TB/s\n`{meta['command']}`\n")
  print("| batch | context | summaries | step ms (median) | host ms | roofline ms | step / roofline | KV bytes / seq | decode compiles |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['batch']} | {r['context']} | {r['summaries'] or 'off'} | {r['step_ms_median'] or float('nan'):.3f} | "
          f"{r['host_ms_median'] or float('nan'):.3f} | {r.get('roofline_ms', float('nan')):.3f} | {r.get('vs_roofline', float('nan')):.2f} | "
          f"{r['kv_bytes_per_seq'] / 2**20:.1f} MiB | {r['decode_compiles']} |")
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
