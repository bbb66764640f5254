#!/usr/bin/env python3
"""What the smallest Mosaic GPU kernels cost on this GPU: the floor under the decode kernel.

Times (CUPTI device time, median over calls that rotate inputs to defeat L2, as
scripts/bench_kernels.py does) four stripped-down kernels over the same grid of P programs as the
decode kernel, each program writing one [8, D] output row through SMEM and TMA as the decode
kernel writes its rows:
  empty      nothing else: launch, prologue, one write, teardown
  plan       first the decode kernel's plan: a scalar load of a length and a TMA of 32 block
             ids, waited for (one dependent DRAM round trip)
  kv         plan, then K and V boxes of T tokens x D (bf16, tiled and swizzled as the decode
             kernel's ring) from the row the first block id names: the decode kernel's memory
             traffic with no math
  kv_direct  the K and V boxes without the plan (their rows known up front)

  python3 scripts/probe_floor.py --programs 24,96,132,192 --tokens 64,128,512 --json out.json

Needs an NVIDIA Hopper GPU (run it through the device tool).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_kernels import L2_BYTES  # noqa: E402  (numpy only at import; jax stays lazy)

MODES = ("empty", "plan", "kv", "kv_direct")
IDS = 32  # block ids per program's table row


def build(mode: str, P: int, T: int, D: int):
  """The jitted probe kernel: (lengths [P], table [P, IDS], k [P*T, D], v [P*T, D]) -> out."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  dtype = jnp.bfloat16
  box = min(T, 256)
  boxes = T // box

  def body(len_ref, bt_ref, k_ref, v_ref, o_ref):
    p = lax.axis_index("p")

    def scope(ids_smem, k_smem, v_smem, o_smem, bars, kv_bars):
      row0 = p * T
      val = jnp.int32(0)
      if mode in ("plan", "kv"):
        length = len_ref[p]
        plgpu.copy_gmem_to_smem(bt_ref.at[p], ids_smem, bars.at[0])
        plgpu.barrier_wait(bars.at[0])
        val = length + ids_smem[0]
        row0 = ids_smem[0] * T  # the table holds the program's own index: a dependent address
      if mode in ("kv", "kv_direct"):
        for i in range(boxes):  # a TMA box spans at most 256 rows
          rows = pl.ds(row0 + i * box, box)
          plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[pl.ds(i * box, box)], kv_bars.at[0])
          plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[pl.ds(i * box, box)], kv_bars.at[1])
        plgpu.barrier_wait(kv_bars.at[0])
        plgpu.barrier_wait(kv_bars.at[1])
      o_smem[...] = jnp.full((8, D), val.astype(jnp.float32), dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_ref.at[p])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scope,
                  plgpu.SMEM((IDS,), jnp.int32),
                  plgpu.SMEM((T, D), dtype, transforms=(tiling, swizzle)),
                  plgpu.SMEM((T, D), dtype, transforms=(tiling, swizzle)),
                  plgpu.SMEM((8, D), dtype),
                  plgpu.Barrier(num_arrivals=1, num_barriers=1),
                  plgpu.Barrier(num_arrivals=boxes, num_barriers=2))

  call = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((P, 8, D), dtype), grid=(P,),
                      grid_names=("p",), kernel_name=f"probe_{mode}")
  return jax.jit(call)


def inputs(P: int, T: int, D: int):
  """Rotated argument sets: R copies of K and V, so that the R sets together exceed 4x L2."""
  import jax.numpy as jnp
  import numpy as np
  nbytes = 2 * P * T * D * 2
  R = int(min(16, max(2, -(-4 * L2_BYTES // nbytes))))
  lengths = jnp.full((P,), 7, jnp.int32)
  table = jnp.asarray(np.tile(np.arange(P, dtype=np.int32)[:, None], (1, IDS)))
  sets = []
  for r in range(R):
    k = jnp.full((P * T, D), r + 1, jnp.bfloat16)
    sets.append((lengths, table, k, k + 1))
  return sets, nbytes


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--programs", default="24,48,96,132,192,264")
  p.add_argument("--tokens", default="64,128,256,512", help="tokens of K (and of V) per program")
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--iters", type=int, default=40)
  p.add_argument("--json", help="write the results here")
  args = p.parse_args(argv)
  bad = sorted(set(args.modes.split(",")) - set(MODES))
  if bad:
    print(f"error: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}", file=sys.stderr)
    return 2
  import jax
  if jax.default_backend() != "gpu":
    print("error: needs an NVIDIA Hopper GPU (run it through the device tool)", file=sys.stderr)
    return 2
  from bench_kernels import Timer
  timer = Timer()
  D = args.head_dim
  rows = []
  for P in (int(x) for x in args.programs.split(",")):
    for T in (int(x) for x in args.tokens.split(",")):
      sets, nbytes = inputs(P, T, D)
      row = dict(programs=P, tokens=T, head_dim=D, kv_bytes=nbytes)
      for mode in args.modes.split(","):
        f = build(mode, P, T, D)
        out = f(*sets[0])
        want = 7 if mode in ("plan", "kv") else 0  # program 0: its length (7) + its first id (0)
        if float(out[0, 0, 0]) != want:
          raise SystemExit(f"probe {mode} P={P} T={T}: wrote {float(out[0, 0, 0])}, not {want}")
        t = timer(f, sets, args.iters)
        row[mode] = round(t["ms"] * 1e3, 2)  # us
      row["kv_tbps"] = round(nbytes / (row["kv"] * 1e-6) / 1e12, 2) if "kv" in row else None
      rows.append(row)
      print(json.dumps(row), flush=True)
      del sets
  print(f"\ndevice {jax.devices()[0].device_kind}, jax {jax.__version__}; CUPTI us, median of "
        f"{args.iters} calls; d={D}, bf16\n")
  print("| programs | tokens (K and V each) | KV bytes | " + " | ".join(args.modes.split(","))
        + " | kv TB/s |")
  print("| --- | --- | --- | " + " | ".join("---" for _ in args.modes.split(",")) + " | --- |")
  for r in rows:
    print(f"| {r['programs']} | {r['tokens']} | {r['kv_bytes'] / 1e6:.2f} MB | "
          + " | ".join(f"{r[m]:.2f}" for m in args.modes.split(",")) + f" | {r['kv_tbps']} |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                     command=" ".join(sys.argv), rows=rows), fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
