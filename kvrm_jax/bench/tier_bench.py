"""Host memory tier benchmark: a workload whose KV exceeds the device (HBM) KV budget.

The same forced-length requests run, one configuration after the other, on a device KV pool of
--hbm-gb:
  off        no host tier: requests wait, and preemption drops and recomputes KV
  swap       host tier for swap preemption only (KV copied out and back instead of recomputed)
  place-R<n> placement + swap: running requests keep cold blocks on host extents of n blocks that
             the decode step stages layer by layer (n=1 is the block-by-block baseline)
Reported per configuration: tokens/s, completed requests, preemptions (recompute / swap), host
copies per step and their size, and the placement bound of arXiv 2508.13231: the best aggregate
KV read bandwidth the step's KV could get over HBM + host given the HBM budget, against what the
step achieved (KV bytes / (step time - weight bytes at copy bandwidth)).

  python scripts/bench_tier.py --model llama3-8b --dtype bfloat16 --hbm-gb 4 --host-gb 24 \
      --requests 32 --prompt 2048 --output 64 --configs off swap place-R8 place-R1 --report docs/tiering.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from tqdm import tqdm

from kvrm_jax import bench as bc
from kvrm_jax.bench.step_bench import copy_bandwidth
from kvrm_jax.cli import UserError, run_main
from kvrm_jax.config import RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.sched import tier as tier_lib
from kvrm_jax.step import tier


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="tiny", choices=("tiny", "smollm2-135m", "llama3-8b"))
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
  p.add_argument("--hbm-gb", type=float, default=None, help="device KV pool (GB); default: 1/3 of the workload's KV")
  p.add_argument("--host-gb", type=float, default=None, help="host KV tier (GB); default: the workload's KV")
  p.add_argument("--requests", type=int, default=8)
  p.add_argument("--prompt", type=int, default=48, help="prompt tokens per request")
  p.add_argument("--output", type=int, default=16, help="forced output tokens per request")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--configs", nargs="+", default=["off", "swap", "place-R8", "place-R1"])
  p.add_argument("--policy", default="recency", choices=("recency", "attention"))
  p.add_argument("--warmup-limit", type=float, default=120.0, help="seconds of warm-up run per configuration")
  p.add_argument("--max-wall", type=float, default=None, help="seconds per configuration (the rest is reported unfinished)")
  p.add_argument("--attention", default="auto")
  p.add_argument("--layer-loop", default="auto", choices=("auto", "scan", "unroll"))
  p.add_argument("--out-json")
  p.add_argument("--report", help="write the markdown report (and a PNG beside it) here")
  p.add_argument("--from-json", help="regenerate the report from saved raw results, run nothing")
  p.add_argument("--quiet", action="store_true")
  bc.compile_cache.add_args(p)
  return p.parse_args(argv)


def link_bandwidth() -> dict:
  """Host<->device copy bandwidth of 1 GiB between pinned host and device memory (median of 5), B/s."""

  kind = tier.host_memory_kind()
  if kind is None or jax.default_backend() == "cpu":
    return {"h2d": None, "d2h": None, "memory_kind": kind}
  dev = jax.devices()[0]
  n = 1 << 29  # bf16 elements = 1 GiB
  host = jax.device_put(np.zeros(n, jnp.bfloat16), SingleDeviceSharding(dev, memory_kind=kind))
  out = {}
  for name, src, dst in (("h2d", host, SingleDeviceSharding(dev, memory_kind="device")),
                         ("d2h", None, SingleDeviceSharding(dev, memory_kind=kind))):
    if src is None:
      src = jax.device_put(host, SingleDeviceSharding(dev, memory_kind="device"))
    ts = []
    for _ in range(6):
      t = time.perf_counter()
      jax.block_until_ready(jax.device_put(src, dst))
      ts.append(time.perf_counter() - t)
    out[name] = 2 * n / float(np.median(ts[1:]))
  out["memory_kind"] = kind
  return out


def runtime(cfg_name: str, base: dict, work_blocks: int, args):
  """RuntimeConfig of one configuration."""
  kw = dict(base)
  if cfg_name == "off":
    return RuntimeConfig(**kw)
  kw.update(host_blocks=args.host_blocks, host_extent=1, max_swap_extents=work_blocks)
  if cfg_name == "swap":
    kw["host_extent"] = 8
    kw["max_swap_extents"] = -(-work_blocks // 8)
    kw["host_blocks"] = max(args.host_blocks // 8 * 8, 16)
    return RuntimeConfig(**kw)
  if not cfg_name.startswith("place-R"):
    raise UserError(f"unknown configuration {cfg_name!r} (off, swap, place-R<extent>)")
  r = int(cfg_name[len("place-R"):])
  per_seq = base["max_blocks_per_seq"]
  kw.update(host_extent=r, host_blocks=max(args.host_blocks // r * r, 2 * r),
            max_swap_extents=max(1, -(-work_blocks // r)),
            max_host_reads=max(1, base["max_slots"] * -(-per_seq // r)), max_host_blocks_per_seq=per_seq)
  return RuntimeConfig(**kw)


def run_config(name, cfg, model, rt, prompts, args, token_bytes, weight_bytes, copy_bw, link) -> dict:
  eng = Engine(cfg, model, rt, tier_policy=args.policy)
  runner = bc.Runner(eng, name, token_bytes * rt.block_size)
  t0 = time.perf_counter()
  # every prefill bucket compiled before the clock starts
  runner.warmup(rt.max_seq_len, cfg.vocab_size, log=lambda line: print(f"[{name}] {line}", flush=True))
  # A short run of the same workload, so that swaps, placement and whatever executables their first
  # use brings (a GPU recompile of a step for new buffer layouts was seen) happen before the clock.
  wids = []
  for p in prompts:
    runner.add(p, args.output, time.perf_counter(), wids)  # (a request the engine rejects is skipped)
  while any(not eng.requests[r].done for r in wids) and time.perf_counter() - t0 < args.warmup_limit:
    eng.step()
  for r in wids:
    eng.abort(r)
  warm = time.perf_counter() - t0
  mark = runner.mark()
  n_series = len(eng.stats.tier_series)
  c0 = {k: getattr(eng.stats, k) for k in ("placed_blocks", "swap_preemptions", "swap_out_extents", "swap_in_extents")}
  rids, rejected = [], 0
  t_start = time.perf_counter()
  for p in prompts:
    rejected += not runner.add(p, args.output, t_start, rids)
  bar = None
  if not args.quiet:
    bar = tqdm(total=len(rids) * args.output, unit="tok", desc=name, leave=False)
  while any(not eng.requests[r].done for r in rids):
    if args.max_wall and time.perf_counter() - t_start > args.max_wall:
      break
    ev = runner.step()
    if bar is not None:
      bar.update(sum(len(v) for v in ev.values()))
  t_end = time.perf_counter()
  if bar is not None:
    bar.close()
  m = runner.finish(rids, rejected, mark, t_start, t_end)
  m.update(config=name, warmup_s=warm, runtime={k: getattr(rt, k) for k in (
      "num_blocks", "max_slots", "host_blocks", "host_extent", "max_swap_extents", "max_host_reads")})
  st = eng.stats
  ser = np.array(st.tier_series[n_series:], float).reshape(-1, 4)
  bs, r = rt.block_size, rt.host_extent
  extent_bytes = r * bs * token_bytes // (2 * cfg.num_layers)  # one extent of one layer, K or V
  m["tier"] = None if eng.sched.tier is None else {
      "policy": args.policy, **{k: getattr(st, k) - v for k, v in c0.items()},
      "peak_host_blocks": int(ser[:, 3].max()) if len(ser) else 0,
      # per decode step: staged extents -> 2 (K, V) x layers copies of extent_bytes each
      "staged_extents_per_step": float(ser[:, 2].mean()) if len(ser) else 0.0,
      "copies_per_step": float(ser[:, 2].mean() * 2 * cfg.num_layers + 2 * (ser[:, 0] + ser[:, 1]).mean()) if len(ser) else 0.0,
      "bytes_per_copy": extent_bytes,
      "host_bytes_per_step": float(ser[:, 2].mean() * 2 * cfg.num_layers * extent_bytes) if len(ser) else 0.0}
  # Placement bound: the step's KV over HBM (capacity = the device pool) + host, both streaming.
  step_s = (m["step_ms"]["p50"] or 0) / 1e3
  live = [x[2] for x in m["series"]["kv"]]
  host_b = m["tier"]["host_bytes_per_step"] if m["tier"] else 0.0
  kv_b = (float(np.median(live)) if live else 0.0) + host_b
  if copy_bw and link.get("h2d") and step_s > 0:
    t_kv = max(step_s - weight_bytes / copy_bw, 1e-6)
    bound = tier_lib.placement_bound(kv_b, (rt.num_blocks - 1) * bs * token_bytes, copy_bw, link["h2d"])
    m["bound"] = dict(bound, kv_bytes_per_step=kv_b, achieved_bandwidth=kv_b / t_kv,
                      fraction=(kv_b / t_kv) / bound["bandwidth"])
  m["host_pool_memory_kind"] = None if eng.sched.tier is None else eng.k_host.sharding.memory_kind
  del eng, runner
  bc.free_device_memory()
  return m


def main(argv=None) -> int:
  return run_main(_main, argv)


def _main(argv) -> int:
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      obj = json.load(f)
    if args.report:
      render(obj, args.report)
    print_table(obj)
    return 0
  bc.check_outputs(args.out_json, args.report)
  bc.check_max_wall(args.max_wall)
  bc.compile_cache.from_args(args)
  dtype = args.dtype or bc.default_dtype()
  cfg, model, source = bc.load_model(args.model, dtype)
  token_bytes = bc.kv_block_bytes(cfg, args.block_size, dtype) // args.block_size
  bs = args.block_size
  per_seq = -(-(args.prompt + args.output + 1) // bs)
  work_blocks = args.requests * per_seq
  work_gb = work_blocks * bs * token_bytes / 1e9
  hbm_blocks = int(args.hbm_gb * 1e9 / (bs * token_bytes)) if args.hbm_gb else max(work_blocks // 3, per_seq + 2)
  args.host_blocks = int(args.host_gb * 1e9 / (bs * token_bytes)) if args.host_gb else work_blocks + 64
  if hbm_blocks < -(-args.prompt // bs) + 1:  # a prompt's KV is computed on the device
    raise UserError(f"--hbm-gb holds {hbm_blocks} blocks, one prompt needs {-(-args.prompt // bs) + 1}")
  base = dict(block_size=bs, num_blocks=hbm_blocks + 1, max_slots=args.requests, max_blocks_per_seq=per_seq,
              max_groups=8, max_moves=16, prefill_buckets=(256,) if args.prompt > 64 else (16, 64),
              max_prefill_seqs=2, dtype=dtype, attention=args.attention, max_summaries=0, max_folds=0,
              layer_loop=args.layer_loop)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, args.prompt).tolist() for _ in range(args.requests)]
  weight_bytes = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model))) * (4 if dtype == "float32" else 2)
  copy_bw = copy_bandwidth()
  copy_bw = copy_bw * 1e12 if copy_bw else None
  link = link_bandwidth()
  runs = []
  for name in args.configs:
    rt = runtime(name, base, work_blocks, args)
    try:
      runs.append(run_config(name, cfg, model, rt, prompts, args, token_bytes, weight_bytes, copy_bw, link))
    except Exception as e:  # noqa: BLE001  (a configuration that fails is reported, the others still run)
      runs.append({"config": name, "error": f"{type(e).__name__}: {str(e)[:600]}"})
    print(json.dumps({k: v for k, v in runs[-1].items() if k != "series" and k != "itl_cdf_ms"})[:1500],
          file=sys.stderr, flush=True)
  obj = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                  "command": bc.command_line("bench_tier.py", argv if argv is not None else sys.argv[1:]),
                  "model": bc.model_info(cfg, model, dtype, source), "workload_kv_gb": work_gb,
                  "hbm_kv_gb": hbm_blocks * bs * token_bytes / 1e9, "host_kv_gb": args.host_blocks * bs * token_bytes / 1e9,
                  "requests": args.requests, "prompt": args.prompt, "output": args.output, "policy": args.policy,
                  "copy_bandwidth": copy_bw, "link": link, "weight_bytes": weight_bytes},
         "runs": runs}
  if args.out_json:
    bc.write_json(args.out_json, obj)
  if args.report:
    render(obj, args.report)
  print_table(obj)
  return 0


def rows(obj):
  out = []
  for r in obj["runs"]:
    if "error" in r:
      out.append(f"| {r['config']} | failed: {r['error'][:200]} | | | | | | | |")
      continue
    t, b = r.get("tier") or {}, r.get("bound")
    out.append(
        f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['completed']}/{r['requests']} ({r['rejected']} rejected) | "
        f"{r['step_ms']['p50'] or float('nan'):.2f} | "
        f"{r['preemptions'] - t.get('swap_preemptions', 0)} / {t.get('swap_preemptions', 0)} | "
        f"{t.get('placed_blocks', 0)} | {t.get('copies_per_step', 0):.0f} x {t.get('bytes_per_copy', 0) / 1e3:.0f} KB | "
        f"{t.get('peak_host_blocks', 0)} | "
        f"{bound_text(b)} |")
  return out


def bound_text(b) -> str:
  if not b:
    return "n/a (CPU)"
  return f"{b['achieved_bandwidth'] / 1e12:.2f} / {b['bandwidth'] / 1e12:.2f} TB/s ({100 * b['fraction']:.0f}%)"


HEADER = ("| config | tokens/s | completed | step ms (p50) | preemptions recompute / swap | blocks placed | "
          "host copies / step x size | peak host blocks | KV bandwidth achieved / bound |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def print_table(obj):
  m = obj["meta"]
  print(f"{m['date']}, {m['device']}, jax {m['jax']}; workload KV {m['workload_kv_gb']:.2f} GB, "
        f"HBM KV budget {m['hbm_kv_gb']:.2f} GB, host tier {m['host_kv_gb']:.2f} GB\n`{m['command']}`\n")
  print(HEADER)
  print("\n".join(rows(obj)))


def render(obj, md_path):
  m = obj["meta"]
  link = m.get("link") or {}
  os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
  png = os.path.splitext(md_path)[0] + ".png"
  plotted = plot(obj, png)
  fmt = lambda x: "n/a" if not x else f"{x / 1e9:.1f} GB/s"  # noqa: E731
  text = [
      "# Host memory tier: results",
      "",
      f"{m['date']}, {m['device']}, jax {m['jax']}, model {m['model']['name']} ({m['model']['source']}, "
      f"{m['model']['dtype']}). Command:",
      "",
      f"`{m['command']}`",
      "",
      f"Workload: {m['requests']} requests x ({m['prompt']} prompt + {m['output']} forced output tokens) = "
      f"{m['workload_kv_gb']:.2f} GB of KV; device KV pool {m['hbm_kv_gb']:.2f} GB; host tier "
      f"{m['host_kv_gb']:.2f} GB ({link.get('memory_kind')}). Link: host->device {fmt(link.get('h2d'))}, "
      f"device->host {fmt(link.get('d2h'))}; device copy bandwidth "
      f"{'n/a' if not m['copy_bandwidth'] else '%.2f TB/s' % (m['copy_bandwidth'] / 1e12)}. Placement policy: {m['policy']}.",
      "",
      HEADER,
      *rows(obj),
      "",
      "Host copies per step: extents staged per layer x 2 (K, V) x layers, plus swap extents (each an "
      "extent of all layers). Bound (arXiv 2508.13231, static form): the step's KV bytes (device + host "
      "resident) over the best split between HBM (capacity = device pool, copy bandwidth) and host "
      "(host->device bandwidth), both streaming at once; achieved = the same bytes over (step time - "
      "weight bytes at copy bandwidth).",
  ]
  if plotted:
    text += ["", f"![tier]({os.path.basename(png)})"]
  with open(md_path, "w") as f:
    f.write("\n".join(text) + "\n")


def plot(obj, png) -> bool:
  plt.switch_backend("Agg")
  runs = [r for r in obj["runs"] if "error" not in r]
  if not runs:
    return False
  fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
  ax[0].bar([r["config"] for r in runs], [r["tokens_per_s"] for r in runs], color="tab:blue")
  ax[0].set_ylabel("output tokens/s")
  ax[0].set_title("throughput (KV over the HBM budget)")
  for r in runs:
    s = np.array(r["series"]["kv"], float).reshape(-1, 3)
    if len(s):
      ax[1].plot(s[:, 0], s[:, 2] / 1e9, label=f"{r['config']} live on device")
  ax[1].set_xlabel("s")
  ax[1].set_ylabel("GB")
  ax[1].set_title("device-resident live KV over time")
  ax[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  plt.close(fig)
  return True

