"""Host overhead of one decode step: scheduling (pager appends, compaction planning) plus building
and packing the committed descriptor, at N active slots, with no device work in the loop.

  python scripts/bench_host.py --slots 256 --steps 2000 --out-json docs/raw/host.json

Writes a markdown table to stdout (and the JSON); docs/step.md ("Host overhead") records a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

from kvrm_jax.bench.results import check_outputs
from kvrm_jax.cli import UserError
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model.llama import Llama
from kvrm_jax.sched.request import SamplingParams


def measure(slots: int, steps: int, block_size: int, prompt_len: int, max_groups: int, seed: int = 0) -> dict:


  cfg = dataclasses.replace(ModelConfig.from_name("tiny"), max_position=1 << 20)  # host-only: no context limit
  mb = -(-(prompt_len + steps + 1) // block_size)
  rt = RuntimeConfig(block_size=block_size, num_blocks=1 + slots * mb + 64, max_slots=slots, max_blocks_per_seq=mb,
                     max_groups=max_groups, max_moves=16)
  eng = Engine(cfg, Llama(cfg, rngs=nnx.Rngs(0)), rt)
  rng = np.random.default_rng(seed)
  for _ in range(slots):
    n = int(rng.integers(prompt_len // 2, prompt_len + 1))
    eng.add_request(rng.integers(3, cfg.vocab_size, n).tolist(), SamplingParams(max_new_tokens=steps + 1))
  eng.sched.admit()
  for req in list(eng.sched.slots.reqs):  # stand in for the prefill: the prompts' KV is "computed"
    req.num_computed = req.prefill_target
    req.output_ids.append(int(rng.integers(3, cfg.vocab_size)))
    eng.sched.slots.mark_running(req)
    eng.sched.allocator.commit_tokens(req.id, req.all_ids[:req.num_computed])
  sched_us, build_us = [], []
  tokens = np.full((slots,), 7, np.int32)  # stand-in sampled tokens
  for _ in range(steps):
    t0 = time.perf_counter()
    plan = eng.schedule()
    t1 = time.perf_counter()
    eng.build_decode_descriptor(plan)
    t2 = time.perf_counter()
    sched_us.append((t1 - t0) * 1e6)
    build_us.append((t2 - t1) * 1e6)
    eng.sched.finish_decode(plan, tokens, 0.0, {})  # the engine's own postprocess, no device
    assert len(plan.decode) == slots
  tot = np.add(sched_us, build_us)
  return {"slots": slots, "steps": steps, "block_size": block_size, "prompt_len": prompt_len,
          "schedule_us_median": float(np.median(sched_us)), "descriptor_us_median": float(np.median(build_us)),
          "total_us_median": float(np.median(tot)), "total_us_p99": float(np.percentile(tot, 99)),
          "descriptor_int32_words": eng.dlayout.int_size, "descriptor_float32_words": eng.dlayout.float_size}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--slots", type=int, nargs="+", default=[64, 256])
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--prompt-len", type=int, default=512)
  p.add_argument("--max-groups", type=int, default=4)
  p.add_argument("--out-json")
  args = p.parse_args(argv)
  try:
    check_outputs(args.out_json)
  except UserError as e:
    p.error(str(e))
  rows = [measure(s, args.steps, args.block_size, args.prompt_len, args.max_groups) for s in args.slots]
  meta = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
          "command": "python scripts/bench_host.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  print(f"{meta['date']}, {meta['cpu']} x{meta['cores']}, python {meta['python']}, jax {meta['jax']}")
  print(f"`{meta['command']}`\n")
  print("| slots | schedule µs (median) | descriptor µs (median) | total µs (median) | total µs (p99) | descriptor words (int32 + f32) |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['slots']} | {r['schedule_us_median']:.0f} | {r['descriptor_us_median']:.0f} | "
          f"{r['total_us_median']:.0f} | {r['total_us_p99']:.0f} | "
          f"{r['descriptor_int32_words']} + {r['descriptor_float32_words']} |")
  if args.out_json:
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  return 0

