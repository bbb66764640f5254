#!/usr/bin/env python3
"""Where the Mosaic decode kernel's time goes: its on-device trace, summarised per phase.

Runs `paged_decode_attention(backend="mosaic")` on the benchmark's inputs (contiguous blocks)
with $KVRM_MOSAIC_PROFILE_DIR set, so that Mosaic GPU records, per program and warpgroup, when
each named region of the kernel begins and ends: the plan's wait (block-table copy), every K and
V wait, and the output write. Prints a markdown table of medians over the programs of the
first call after compiling (Mosaic writes one trace per compile).

  python scripts/profile_kernel.py --configs 9/3/64x8x512,9/3/64x8x512@64:2:8:1 [--json out.json]

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
  starts, rows, spans = [], [], []
  for evs in progs.values():
    t0 = evs[0]["ts"]  # us: the program's global start plus cycles / 1e3 since
    starts.append(t0)
    open_at, total, span = {}, {}, {}
    for ev in evs:
      cyc = (ev["ts"] - t0) * 1e3
      name = ev["name"]
      if ev["ph"] == "B":
        open_at[name] = cyc
        span.setdefault(name, [cyc, cyc])
      else:
        total[name] = total.get(name, 0.0) + cyc - open_at.pop(name)
        span[name][1] = cyc
        if name == "wait_plan":
          total["plan_done_at"] = cyc
    total["end_at"] = (evs[-1]["ts"] - t0) * 1e3
    rows.append(total)
    spans.append(span)
  first = min(starts)
  keys = ("plan_done_at", "wait_plan", "wait_k", "wait_v", "write", "end_at")
  med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
  # The timeline: per region, medians over programs of its first start, its last end and its
  # total time (a region inside the chunk loop runs once per chunk), in cycles since the start.
  names = sorted({n for sp in spans for n in sp},
                 key=lambda n: statistics.median(sp[n][0] for sp in spans if n in sp))
  timeline = [dict(region=n,
                   first_start=statistics.median(sp[n][0] for sp in spans if n in sp),
                   last_end=statistics.median(sp[n][1] for sp in spans if n in sp),
                   total=statistics.median(r[n] for r in rows if n in r),
                   programs=sum(n in sp for sp in spans)) for n in names]
  return dict(programs=len(rows), sms=len({ev["pid"] for ev in trace["traceEvents"]}),
              start_spread_us=statistics.median(s - first for s in starts),
              start_spread_max_us=max(s - first for s in starts), timeline=timeline,
              **{f"{k}_cycles": v for k, v in med.items()})


def run(configs):
  import jax
  import jax.numpy as jnp
  from pallas_kernels.paged_attention import paged_decode_attention, resolve_tile
  from pallas_kernels import paged_attention_mgpu as mgpu
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  from bench_kernels import make_inputs, parse_variants
  out = []
  for cfg in configs:
    shape, _, tile_arg = cfg.partition("@")
    heads, B, L = shape.split("x")
    hq, hkv, d = (int(x) for x in heads.split("/"))
    B, L = int(B), int(L)
    tile = {}
    if tile_arg:  # chunk tokens : stages : splits : streams, as bench_kernels.py --variants
      [(ct, st, sp, ns)] = parse_variants(tile_arg)
      tile = dict(chunk_tokens=ct, stages=st, num_splits=sp, streams=ns)
    inp = make_inputs(B, L, hq, hkv, d)
    bt, groups, ng = inp["sets"]["contiguous"][0]
    args = (inp["qs"][0], inp["k_pool"], inp["v_pool"], inp["lengths"], bt, groups, ng)
    _, part = resolve_tile(args[0], args[1], bt, backend="mosaic",
                           **{k: v for k, v in tile.items() if k != "stages"})
    with tempfile.TemporaryDirectory() as tmp:
      os.environ[mgpu.PROFILE_ENV] = tmp
      f = jax.jit(lambda *a: paged_decode_attention(*a, backend="mosaic", **tile))
      # Mosaic names the trace file when it lowers the kernel, so only a compile's first call
      # is written (later ones warn that it exists): one call.
      try:
        jax.block_until_ready(f(*args))
        jax.effects_barrier()
      except Exception as e:  # noqa: BLE001  (a tile Mosaic refuses: report it, go on)
        print(f"{cfg}: FAILED {str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)
        continue
      finally:
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
                 help="comma-separated heads q/kv/d x batch x length, each optionally followed by "
                      "@chunk_tokens:stages:splits:streams (default: the default tile)")
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
  for r in res:
    t = r["tile"]
    print(f"\nTimeline of {r['config']} (c{t['chunk_tokens']} sp{t['num_splits']} w{t['streams']}), "
          "cycles since the program's start, medians over programs:\n")
    print("| region | first start | last end | total |")
    print("| --- | --- | --- | --- |")
    for e in r["timeline"]:
      print(f"| {e['region']} | {e['first_start']:.0f} | {e['last_end']:.0f} | {e['total']:.0f} |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(clock_mhz=clock.strip(), results=res), fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
