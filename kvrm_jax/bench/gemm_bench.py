"""The projection GEMMs of a decode step at decode row counts: who streams the weights fastest.

For each weight shape of a model (Llama-3-8B: qkv 4096x6144, wo 4096x4096, gate_up 4096x28672,
down 14336x4096, the LM head 4096x128256) and each row count M, it times y = x[M, K] @ w[K, N] in
bf16 by
  xla     XLA's dot with its default GEMM choice (Triton fusions on Hopper),
  cublas  XLA's dot with `xla_gpu_enable_triton_gemm=false` (cuBLAS),
  skinny  the weight-streaming Mosaic GPU kernel (pallas_kernels/skinny_matmul.py) with the plan
          `choose_plan` picks, or with every plan of a small grid (--sweep);
  jax-hopper  JAX's own warp-specialized Hopper matmul (jax.experimental.pallas.ops.gpu.
          hopper_matmul_mgpu) in the configurations of HOPPER_CONFIGS, rows padded to the config's
          tile (one of them a CTA pair over 256 rows sharing each weight tile by TMA multicast).
Method: L copies of the weights (together >= 400 MB, so that no copy is still in the 50 MB L2 when
it is read again) multiplied back to back in one jitted call, --reps calls per timing, the median
of 3 timings, divided by L. It reports microseconds per GEMM, the weights' bytes over that time
(TB/s) and its fraction of the copy ceiling measured in the same run, and the error against an
f32 product.

    python scripts/bench_gemm.py --out-json gemm.json
    python scripts/bench_gemm.py --rows 8 148 --shapes qkv down --variants xla skinny --sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax import bench as bc
from kvrm_jax.config import ModelConfig
from kvrm_jax.bench.step_bench import copy_bandwidth
from kvrm_jax.step import gemm
from pallas_kernels import skinny_matmul as sm

OPTIONS = {"xla": {}, "cublas": {"xla_gpu_enable_triton_gemm": False}}
VARIANTS = ("xla", "cublas", "skinny", "jax-hopper")
# hopper_matmul_mgpu.TuningConfig fields; rows = the row multiple each needs (tile_m x warpgroups x cluster).
HOPPER_CONFIGS = (
    dict(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=4, wg_dimension="M", cluster_dimension="M", rows=256),
    dict(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=6, wg_dimension="M", cluster_dimension="M", rows=256),
    dict(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=4, wg_dimension="N", cluster_dimension=None, rows=64),
)


def hopper_matmul(x, w, config: dict):
  """x @ w by JAX's Hopper matmul kernel, x's rows padded to config["rows"]'s multiple."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  c = {k: v for k, v in config.items() if k != "rows"}
  for f in ("wg_dimension", "cluster_dimension"):
    c[f] = None if c[f] is None else hm.MatmulDimension[c[f]]
  m = x.shape[0]
  mp = -(-m // config["rows"]) * config["rows"]
  xp = jnp.pad(x, ((0, mp - m), (0, 0)))
  try:
    y = hm.matmul(xp, w, None, hm.TuningConfig(**c))
  except TypeError:  # a jax whose matmul takes no `c`
    y = hm.matmul(xp, w, config=hm.TuningConfig(**c))
  return y[:m]
L2_BYTES = 400e6


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(K, N) of the fused projections and the LM head of one layer of cfg (the engine's layout)."""
  d, e = cfg.hidden_size, cfg.head_dim
  return {"qkv": (d, (cfg.num_heads + 2 * cfg.num_kv_heads) * e), "wo": (cfg.num_heads * e, d),
          "gate_up": (d, 2 * cfg.intermediate_size), "down": (cfg.intermediate_size, d),
          "head": (d, cfg.vocab_size)}


def sweep_plans(m: int, k: int, n: int):
  """Every plan of the grid tile_k x n_sub x splits that fits, with the deepest ring that fits."""
  for tk, ns, sp in itertools.product((64, 128, 256), (1, 2, 4), (1, 2, 4, 8)):
    base = sm.GemmPlan(tile_k=tk, n_sub=ns, splits=sp, stages=1)
    try:
      base.check(m, k, n)
    except ValueError:
      continue
    yield sm.deepest_ring(base, m)


def _time(compiled, reps: int, *args) -> tuple[float, object]:
  out = compiled(*args)
  jax.block_until_ready(out)
  runs = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      out = compiled(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - t) / reps)
  return float(np.median(runs)), out


def run_one(name, x, ws, ref, variant, reps, plan=None) -> dict:
  """One (shape, M, variant) row; plan: the skinny kernel's GemmPlan (default choose_plan's) or a
  HOPPER_CONFIGS entry. An "error" row if it does not fit, compile or run."""
  m, k = x.shape
  n = ws[0].shape[1]
  row = {"shape": name, "m": m, "k": k, "n": n, "variant": variant}
  if variant == "jax-hopper":
    row["plan"] = plan
    fn = lambda x, ws: tuple(hopper_matmul(x, w, plan) for w in ws)  # noqa: E731
  elif variant == "skinny":
    plan = plan or sm.choose_plan(m, k, n)
    row["plan"] = dataclasses.asdict(plan)
    fn = lambda x, ws: tuple(sm.skinny_matmul_mgpu(x, w, plan) for w in ws)  # noqa: E731
  else:
    fn = lambda x, ws: tuple(x @ w for w in ws)  # noqa: E731
  try:
    if variant == "skinny":
      plan.check(m, k, n)
    lowered = jax.jit(fn).lower(x, ws)
    compiled = lowered.compile(OPTIONS[variant]) if OPTIONS.get(variant) else lowered.compile()
    dt, out = _time(compiled, reps, x, ws)
  except Exception as e:  # noqa: BLE001  (a plan that does not fit or compile: keep the other rows)
    return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
  per = dt / len(ws)
  err = jnp.max(jnp.abs(out[0].astype(jnp.float32) - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30)
  return dict(row, us=per * 1e6, tb_s=k * n * x.dtype.itemsize / per / 1e12, rel_err=float(err))


def report(rows: list[dict], meta: dict) -> str:
  """A markdown table: per (shape, M), each variant's µs and TB/s (fraction of the copy ceiling),
  the best skinny plan when swept."""
  bw = meta.get("copy_tb_s")
  variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "skinny-sweep"))
  lines = [f"{meta['date']}, {meta['device']}, jax {meta['jax']}, {meta['model']} shapes, {meta['dtype']}, "
           f"copy ceiling {bw and round(bw, 2)} TB/s", f"`{meta['command']}`", "",
           "| shape | M | " + " | ".join(f"{v} µs (TB/s, % of copy)" for v in variants)
           + (" | best swept skinny plan µs |" if any(r["variant"] == "skinny-sweep" for r in rows) else " |"),
           "| --- " * (2 + len(variants) + any(r["variant"] == "skinny-sweep" for r in rows)) + "|"]
  keys = list(dict.fromkeys((r["shape"], r["m"]) for r in rows))
  for s, m in keys:
    cells = []
    for v in variants:  # a variant with several configurations (jax-hopper): its best
      rs = [r for r in rows if (r["shape"], r["m"], r["variant"]) == (s, m, v)]
      r = min((r for r in rs if "us" in r), key=lambda r: r["us"], default=None)
      if not rs:
        cells.append("-")
      elif r is None:
        cells.append("error")
      else:
        frac = f", {100 * r['tb_s'] / bw:.0f} %" if bw else ""
        cells.append(f"{r['us']:.1f} ({r['tb_s']:.2f}{frac})")
    line = f"| {s} | {m} | " + " | ".join(cells) + " |"
    swept = [r for r in rows if (r["shape"], r["m"], r["variant"]) == (s, m, "skinny-sweep") and "us" in r]
    if any(r["variant"] == "skinny-sweep" for r in rows):
      best = min(swept, key=lambda r: r["us"], default=None)
      p = best and best["plan"]
      line += (f" {best['us']:.1f} (tile_k {p['tile_k']}, n_sub {p['n_sub']}, splits {p['splits']}, "
               f"stages {p['stages']}) |" if best else " - |")
    lines.append(line)
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama3-8b", help="the model preset whose weight shapes are timed")
  p.add_argument("--shapes", nargs="+", default=None, help="some of qkv wo gate_up down head (default: all)")
  p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 148, 256], help="row counts M")
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  p.add_argument("--sweep", action="store_true", help="also time every skinny plan of the grid (slow)")
  p.add_argument("--reps", type=int, default=10, help="jitted calls (of L GEMMs each) per timing")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
  p.add_argument("--out-json", help="rows and metadata")
  args = p.parse_args(argv)
  try:
    cfg = ModelConfig.from_name(args.model)
  except ValueError as e:
    p.error(str(e))
  shapes = model_shapes(cfg)
  unknown = sorted(set(args.shapes or ()) - set(shapes))
  if unknown:
    p.error(f"unknown --shapes {unknown}; choose from {sorted(shapes)}")
  if min(args.rows) < 1 or args.reps < 1:
    p.error("--rows and --reps must be positive")
  try:
    bc.check_outputs(args.out_json)
  except bc.UserError as e:
    p.error(str(e))
  kernels = {"skinny", "jax-hopper"}
  if not gemm.kernel_available() and (kernels & set(args.variants) or args.sweep):
    args.variants = [v for v in args.variants if v not in kernels]
    args.sweep = False
    if not args.variants:
      p.error("the Mosaic GPU kernels need an NVIDIA Hopper GPU (H100 / H200); add --variants xla or cublas")
    print("the Mosaic GPU kernels need an NVIDIA Hopper GPU: timing the XLA variants only", file=sys.stderr)
  dtype = jnp.dtype(args.dtype)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
          "device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": args.model, "dtype": args.dtype,
          "copy_tb_s": copy_bandwidth(),
          "command": "python scripts/bench_gemm.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  rows = []
  key = jax.random.PRNGKey(0)
  for name in args.shapes or list(shapes):
    k, n = shapes[name]
    copies = min(64, max(1, int(np.ceil(L2_BYTES / (k * n * dtype.itemsize)))))
    key, sub = jax.random.split(key)
    ws = tuple((jax.random.normal(jax.random.fold_in(sub, i), (k, n), jnp.float32) * 0.02).astype(dtype)
               for i in range(copies))
    for m in args.rows:
      x = jax.random.normal(jax.random.fold_in(sub, 10_000 + m), (m, k), jnp.float32).astype(dtype)
      ref = jnp.dot(x.astype(jnp.float32), ws[0].astype(jnp.float32), precision="highest")
      todo = [(v, None) for v in args.variants if v != "jax-hopper"]
      todo += [("jax-hopper", c) for c in HOPPER_CONFIGS if "jax-hopper" in args.variants]
      todo += [("skinny-sweep", pl) for pl in sweep_plans(m, k, n)] if args.sweep else []
      for variant, plan in todo:
        r = run_one(name, x, ws, ref, "skinny" if variant == "skinny-sweep" else variant, args.reps, plan)
        r["variant"] = variant
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        if args.out_json:
          with open(args.out_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    del ws
  print(report(rows, meta))
  return 0
