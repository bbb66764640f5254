#!/usr/bin/env python3
"""Where the Mosaic decode kernel's time goes: its on-device trace, summarised per phase.

Runs `paged_decode_attention(backend="mosaic")` on the benchmark's inputs (contiguous blocks)
with $KVRM_MOSAIC_PROFILE_DIR set, so that Mosaic GPU records, per program and warpgroup, when
each named region of the kernel begins and ends: the plan's wait (block-table copy), every K and
V wait, and the output write. Prints a markdown table of medians over the programs of the
first call after compiling (Mosaic writes one trace per compile).

  python scripts/profile_kernel.py --configs 9/3/64x8x512,9/3/64x64x512 [--json out.json]

Region times are SM clock cycles (%clock) inside a program; program starts are the global timer
(ns) across programs. Needs an NVIDIA Hopper GPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def summarise(trace: dict) -> dict:
  """Per-program phases from one Perfetto trace of the kernel (events B/E per tid)."""
  progs: dict[int, list] = {}
  for ev in trace["traceEvents"]:
    progs.setdefault(ev["tid"], []).append(ev)
  starts, rows = [], []
  for evs in progs.values():
    t0 = evs[0]["ts"]  # us: the program's global start plus cycles / 1e3 since
    starts.append(t0)
    open_at, total = {}, {}
    for ev in evs:
      cyc = (ev["ts"] - t0) * 1e3
      if ev["ph"] == "B":
        open_at[ev["name"]] = cyc
      else:
        total[ev["name"]] = total.get(ev["name"], 0.0) + cyc - open_at.pop(ev["name"])
        if ev["name"] == "wait_plan":
          total["plan_done_at"] = cyc
    total["end_at"] = (evs[-1]["ts"] - t0) * 1e3
    rows.append(total)
  first = min(starts)
  keys = ("plan_done_at", "wait_plan", "wait_k", "wait_v", "write", "end_at")
  med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
  return dict(programs=len(rows), sms=len({ev["pid"] for ev in trace["traceEvents"]}),
              start_spread_us=statistics.median(s - first for s in starts),
              start_spread_max_us=max(s - first for s in starts), **{f"{k}_cycles": v
                                                                      for k, v in med.items()})


def run(configs):
  import jax
  import jax.numpy as jnp
  from pallas_kernels.paged_attention import paged_decode_attention, resolve_tile
  from pallas_kernels import paged_attention_mgpu as mgpu
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  from bench_kernels import make_inputs
  out = []
  for cfg in configs:
    heads, B, L = cfg.split("x")
    hq, hkv, d = (int(x) for x in heads.split("/"))
    B, L = int(B), int(L)
    inp = make_inputs(B, L, hq, hkv, d)
    bt, groups, ng = inp["sets"]["contiguous"][0]
    args = (inp["qs"][0], inp["k_pool"], inp["v_pool"], inp["lengths"], bt, groups, ng)
    _, part = resolve_tile(args[0], args[1], bt, backend="mosaic")
    with tempfile.TemporaryDirectory() as tmp:
      os.environ[mgpu.PROFILE_ENV] = tmp
      f = jax.jit(lambda *a: paged_decode_attention(*a, backend="mosaic"))
      # Mosaic names the trace file when it lowers the kernel, so only a compile's first call
      # is written (later ones warn that it exists): one call.
      jax.block_until_ready(f(*args))
      jax.effects_barrier()
      del os.environ[mgpu.PROFILE_ENV]
      files = glob.glob(os.path.join(tmp, "*.json"))
      with open(files[0]) as fh:
        s = summarise(json.load(fh))
    s.update(config=cfg, tile=dict(chunk_tokens=part.chunk_tokens, num_splits=part.num_splits,
                                   streams=part.streams), traces=len(files))
    out.append(s)
    print(json.dumps(s), flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default="9/3/64x8x512,9/3/64x64x512,32/8/128x8x512,9/3/64x8x2048",
                 help="comma-separated heads q/kv/d x batch x length")
  p.add_argument("--json", help="write the summaries here")
  args = p.parse_args(argv)
  import jax
  if jax.default_backend() != "gpu":
    print("error: needs an NVIDIA Hopper GPU (run it through the device tool)", file=sys.stderr)
    return 2
  clock = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
  res = run(args.configs.split(","))
  print(f"\nSM clock (MHz, now, max): {clock.strip()}; device {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}\n")
  print("| config | tile | programs | SMs | start spread median / max us | plan done at | "
        "waits: plan / K / V | write | end at (cycles) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in res:
    t = r["tile"]
    print(f"| {r['config']} | c{t['chunk_tokens']} sp{t['num_splits']} w{t['streams']} | "
          f"{r['programs']} | {r['sms']} | {r['start_spread_us']:.2f} / {r['start_spread_max_us']:.2f} | "
          f"{r['plan_done_at_cycles']:.0f} | {r['wait_plan_cycles']:.0f} / {r['wait_k_cycles']:.0f} / "
          f"{r['wait_v_cycles']:.0f} | {r['write_cycles']:.0f} | {r['end_at_cycles']:.0f} |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(clock_mhz=clock.strip(), results=res), fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
