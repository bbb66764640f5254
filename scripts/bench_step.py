#!/usr/bin/env python3
"""End-to-end decode step time against the roofline (weights + KV bytes over measured bandwidth).

B sequences of L tokens each are admitted straight into the pool (their KV is not computed: the
step's cost does not depend on the values), then the engine's own schedule -> descriptor ->
compiled decode step loop runs and each step is timed (dispatch to tokens on the host).

  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048
  python scripts/bench_step.py --model smollm2-135m --batches 64 --context 8192 --summaries sink=1,window=256,max=4
  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --layer-loop scan unroll --profile 5 --dump-hlo /tmp/hlo
  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 --tp 1 2

--layer-loop runs each variant of RuntimeConfig.layer_loop in the same process (rows labelled);
--tp runs each tensor-parallel mesh size in the same process through jax.shard_map (rows labelled;
without --tp the engine has no mesh; the roofline of a row is one device's share of the bytes);
--xla-options does the same for RuntimeConfig.xla_options ("" = the defaults), e.g.
  --xla-options "" "xla_gpu_enable_triton_gemm=false" compares XLA's Triton GEMMs with cuBLAS.
--profile N runs N more decode steps under CUPTI (as scripts/bench_kernels.py does) and prints the
device time per kernel per step (top 20), coarse buckets (matmul / attention / copies / other), the
weight bandwidth the matmul time implies, and device vs wall time per step.
--dump-hlo DIR saves the optimized HLO of each compiled decode step and counts the instructions that
materialize a layer weight (weight-shaped dynamic-slice / slice / copy fusions).
XLA_FLAGS is recorded in the JSON meta (compare e.g. --xla_gpu_enable_dynamic_slice_fusion=true runs).

Writes JSON (--out-json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys
import time

import numpy as np

from kvrm_jax import bench as bc


from kvrm_jax import compile_cache  # noqa: E402


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


# ----------------------------------------------------------------------------- kernel profile

BUCKETS = (  # first match wins; names as CUPTI reports them (XLA fusion names, cuBLAS / Mosaic kernels)
    ("attention", re.compile(r"paged_decode")),  # pallas_kernels: paged_decode_mgpu_* / paged_decode_generic_*
    ("other", re.compile(r"copy_blocks")),  # pallas_kernels/block_copy.py: KV block moves, not weight copies
    # tp > 1: the all-reduces. On one host XLA emits them as its own fusions (`psum_448_0_fusion`
    # on 2x H200, jax 0.11.2); NCCL's kernels where it hands them to NCCL.
    ("collectives", re.compile(r"psum|nccl|all_?reduce|all_?gather", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|xmma|wgmma|matmul|splitk|(^|_)dot(_|$)", re.I)),
    ("copies", re.compile(r"copy|slice", re.I)),  # copy / (dynamic-)slice / dynamic-update-slice fusions, memcpy
)


def bucket(name: str) -> str:
  for b, rx in BUCKETS:
    if rx.search(name):
      return b
  return "other"


def family(name: str) -> str:
  """Kernel name without XLA's instance suffixes (`loop_add_fusion_12` -> `loop_add_fusion`): the
  unrolled graph names each layer's fusion apart, a scan body names it once."""
  return re.sub(r"([._]\d+)+$", "", name)


def matmul_weight_bytes(state, cfg) -> int:
  """Bytes of the weights the matmuls read once per step: the layer projections and the LM head."""
  import jax
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    key = jax.tree_util.keystr(path)
    if any(f"'{n}'" in key for n in ("wqkv", "wo", "w_gate_up", "w_down", "lm_head")) or \
        (cfg.tie_embeddings and "'embed'" in key):
      total += x.size * x.dtype.itemsize
  return total


def aggregate(timings, n: int, weight_bytes: int, copy_tb_s: float | None) -> dict:
  """[(kernel, ms), ...] of n steps -> per-step breakdown by kernel, by family and by bucket."""
  per, fam = {}, {}
  for name, ms in timings:
    for d, k in ((per, name), (fam, family(name))):
      a = d.setdefault(k, [0.0, 0])
      a[0] += ms
      a[1] += 1
  rows = lambda d: sorted(({"name": k, "ms_per_step": v[0] / n, "calls_per_step": v[1] / n}  # noqa: E731
                           for k, v in d.items()), key=lambda r: -r["ms_per_step"])
  kernels = rows(per)
  total = sum(r["ms_per_step"] for r in kernels)
  buckets = {b: 0.0 for b in ("matmul", "attention", "collectives", "copies", "other")}
  calls = dict.fromkeys(buckets, 0.0)
  for r in kernels:
    buckets[bucket(r["name"])] += r["ms_per_step"]
    calls[bucket(r["name"])] += r["calls_per_step"]
  mm_tb_s = weight_bytes / (buckets["matmul"] / 1e3) / 1e12 if buckets["matmul"] > 0 else None
  return {"steps": n, "device_ms_per_step": total, "kernels": kernels, "kernel_families": rows(fam),
          "buckets_ms_per_step": buckets, "bucket_calls_per_step": calls,
          "matmul_weight_bytes": weight_bytes, "matmul_tb_s": mm_tb_s,
          "matmul_vs_copy_ceiling": mm_tb_s / copy_tb_s if mm_tb_s and copy_tb_s else None}


def print_profile(label: str, prof: dict, wall_ms: float | None) -> None:
  if "error" in prof:
    print(f"\nprofile {label}: {prof['error']}; continuing without it")
    return
  tot = prof["device_ms_per_step"]
  pct = lambda ms: 100 * ms / tot if tot else float("nan")  # noqa: E731
  print(f"\n### profile {label}: {prof['steps']} decode steps under CUPTI\n")
  print(f"device time {tot:.3f} ms/step (sum of kernels) vs wall {wall_ms or float('nan'):.3f} ms/step "
        f"(median of the timed steps; {prof['wall_ms_per_step']:.3f} ms/step while profiled); "
        f"{len(prof['kernels'])} distinct kernels, "
        f"{sum(r['calls_per_step'] for r in prof['kernels']):.0f} launches/step\n")
  print("| bucket | ms / step | % device | launches / step |\n| --- | --- | --- | --- |")
  for b, ms in prof["buckets_ms_per_step"].items():
    print(f"| {b} | {ms:.3f} | {pct(ms):.1f} | {prof['bucket_calls_per_step'][b]:.0f} |")
  mm, ceil = prof["matmul_tb_s"], prof["matmul_vs_copy_ceiling"]
  print(f"\nmatmul: {prof['matmul_weight_bytes'] / 1e9:.2f} GB of weights in "
        f"{prof['buckets_ms_per_step']['matmul']:.3f} ms -> {mm and round(mm, 2)} TB/s implied"
        + (f" ({ceil:.2f}x the copy ceiling)" if ceil else "") + "\n")
  tables = (("kernel", "kernels", 20), ("kernel family (instance suffixes dropped)", "kernel_families", 12))
  for title, key, top in tables:
    print(f"| {title} | bucket | ms / step | % device | calls / step |\n| --- | --- | --- | --- | --- |")
    for r in prof[key][:top]:
      name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
      print(f"| `{name}` | {bucket(r['name'])} | {r['ms_per_step']:.4f} | {pct(r['ms_per_step']):.1f} | "
            f"{r['calls_per_step']:g} |")
    print()


# ----------------------------------------------------------------------------- optimized HLO

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"^[a-z]+[0-9]*\[([0-9,]*)\]")


def _dims(shape: str) -> tuple[int, ...] | None:
  m = _SHAPE.match(shape)
  if m is None:
    return None
  return tuple(int(x) for x in m.group(1).split(",") if x and int(x) != 1)


def weight_copies(hlo: str, stacked_shapes) -> dict:
  """Instructions of an optimized HLO module whose result has a layer weight's shape (stacked_shapes
  [L, ...] without L; size-1 dims dropped) and that materialize it: dynamic-slice / slice / copy /
  transpose ops or fusions of them (a GEMM's output never has a weight's shape). Those inside a while
  body run once per layer. `stacked_copy`: copies of a whole [L, ...] stack (e.g. a layout change).
  Also counts GEMM fusions that read a weight through a fused (dynamic-)slice (no copy) and
  dynamic-slice fusions (--xla_gpu_enable_dynamic_slice_fusion: cuBLAS reads the slice in place)."""
  shapes = {tuple(d for d in s[1:] if d != 1) for s in stacked_shapes}
  stacks = {tuple(d for d in s if d != 1) for s in stacked_shapes}
  comps, instrs, bodies, cur = {}, [], [], None
  for line in hlo.splitlines():
    if " = " not in line:
      m = _COMP.match(line)
      if m and not line.lstrip().startswith("HloModule"):
        cur = m.group(1)
        comps.setdefault(cur, [])
      continue
    m = _INSTR.match(line)
    if m is None or cur is None:
      continue
    name, shape, op = m.groups()
    called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
    for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
      called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    comps[cur].append((op, called))
    bodies += re.findall(r"body=%?([\w.\-]+)", line)
    instrs.append((cur, shape, op, called, line))

  def reach(comp, seen):  # computations reachable from comp (itself included)
    if comp in seen:
      return seen
    seen.add(comp)
    for _, called in comps.get(comp, ()):
      for c in called:
        reach(c, seen)
    return seen

  def inner_ops(called):
    out = set()
    for c in called:
      for cc in reach(c, set()):
        out |= {op for op, _ in comps.get(cc, ())}
    return out

  in_loops, fused = set(), set()
  for b in bodies:
    reach(b, in_loops)
  for _, _, op, called, _ in instrs:
    if op == "fusion":
      for c in called:
        reach(c, fused)
  counts = {"dynamic-slice": 0, "slice": 0, "copy": 0, "in_loop_bodies": 0, "stacked_copy": 0,
            "slice_fused_into_gemm": 0, "dynamic_slice_fusion": 0, "while_loops": len(bodies)}
  for comp, shape, op, called, line in instrs:
    if comp in fused:  # counted through its fusion instruction
      continue
    inner = inner_ops(called) if op == "fusion" else set()
    gemm = bool({"dot", "custom-call"} & inner)
    if gemm and {"dynamic-slice", "slice"} & inner:
      counts["slice_fused_into_gemm"] += 1
    if op == "fusion" and "address_computation" in line:
      counts["dynamic_slice_fusion"] += 1
    if _dims(shape) in stacks and (op in ("copy", "transpose") or
                                   (op == "fusion" and not gemm and {"copy", "transpose"} & inner)):
      counts["stacked_copy"] += 1
    if _dims(shape) not in shapes:
      continue
    kind = None
    if op in ("dynamic-slice", "slice", "copy"):
      kind = op
    elif op == "transpose":
      kind = "copy"
    elif op == "fusion" and not gemm:
      kind = ("dynamic-slice" if "dynamic-slice" in inner else "slice" if "slice" in inner else
              "copy" if {"copy", "transpose"} & inner else None)
    if kind:
      counts[kind] += 1
      counts["in_loop_bodies"] += comp in in_loops
  return counts


def dump_hlo(eng, path: str) -> dict:
  """Optimized HLO of the engine's compiled decode step to `path` (the executable it already runs:
  no recompile) and the weight-copy counts of `weight_copies`."""
  import jax
  t = time.perf_counter()
  text = eng.compiled_decode().as_text()
  secs = time.perf_counter() - t
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  ws = sorted({tuple(x.shape) for x in jax.tree.leaves(eng.state) if x.ndim == 3})  # [L, in, out] projections
  c = weight_copies(text, ws)
  c.update(path=path, lower_compile_s=secs, weight_shapes=ws)
  return c


# ----------------------------------------------------------------------------- one configuration


def run_one(cfg, model, batch, context, args, summaries=None, layer_loop="scan", copy_tb_s=None,
            xla_options="", tp=None) -> dict:
  """One configuration; tp=None: the engine without a mesh, tp=N: jax.shard_map over N devices."""
  from kvrm_jax import sharding
  from kvrm_jax.config import RuntimeConfig, parse_xla_options
  from kvrm_jax.engine import Engine
  from kvrm_jax.sequence import SamplingParams

  bs = 16
  # With summaries, time only the steady state: once the prompt's far history has been folded.
  fold_steps = 0 if summaries is None else context // bs // max(1, summaries.max_entries) + 10
  steps = args.warmup + args.iters + fold_steps
  mb = -(-(context + steps + args.profile + 2) // bs)
  rt = RuntimeConfig(block_size=bs, num_blocks=batch * (mb + 2) + 1, max_slots=batch, max_blocks_per_seq=mb,
                     prefill_buckets=(64,), dtype=args.dtype, attention=args.attention,
                     max_folds=4 * batch if summaries else 8, layer_loop=layer_loop,
                     max_summaries=summaries.max_entries if summaries else 0,
                     xla_options=parse_xla_options(xla_options))
  mesh = None if tp is None else sharding.make_mesh(tp)
  eng = Engine(cfg, model, rt, summaries=summaries, mesh=mesh)
  rng = np.random.default_rng(0)
  for _ in range(batch):
    eng.add_request(rng.integers(3, cfg.vocab_size, context).tolist(),
                    SamplingParams(max_new_tokens=steps + args.profile + 2, ignore_eos=True))
  eng._admit()
  for req in list(eng.slots):  # stand in for the prefill: the prompts' KV is "computed"
    req.num_computed = req.prefill_target
    req.output_ids.append(int(rng.integers(3, cfg.vocab_size)))
    eng.mark_running(req)
  last = {}

  def step():
    t0 = time.perf_counter()
    plan = eng.schedule()
    ints, floats = eng.build_decode_descriptor(plan)
    t1 = time.perf_counter()
    tokens, eng.k_pool, eng.v_pool = eng.compiled_decode()(eng.state, eng.k_pool, eng.v_pool,
                                                           *eng.put_descriptor(ints, floats))
    tok = np.asarray(tokens)
    t2 = time.perf_counter()
    eng.postprocess_decode(plan, tok, t2, {})
    last.update(ints=ints, floats=floats)
    return plan, t0, t1, t2

  times, host = [], []
  folds_done_at, first_step_s = None, None
  for i in range(steps):
    plan, t0, t1, t2 = step()
    if i == 0:
      first_step_s = t2 - t0  # trace + compile + one step
    if summaries is not None and not plan.folds and folds_done_at is None and i > 0:
      folds_done_at = i
    if i >= args.warmup and (summaries is None or folds_done_at is not None) and len(times) < args.iters:
      times.append(t2 - t0)
      host.append(t1 - t0)
  itemsize = 2 if args.dtype == "bfloat16" else 4
  # Bytes one device reads per step: its weight shards (replicated ones whole) and its KV heads.
  ecfg = eng.cfg  # heads padded to a multiple of tp where they do not divide
  tok_bytes = 2 * ecfg.num_layers * ecfg.num_kv_heads * ecfg.head_dim * itemsize // (tp or 1)
  exact_tokens = [r.num_computed - r.kv_offset for r in eng.slots]
  blocks = [len(eng.allocator.block_table(r.id)) + (1 if r.sum_base is not None else 0) for r in eng.slots]
  shards = [x.addressable_shards[0].data for x in __import__("jax").tree.leaves(eng.state)]  # one device's
  weight_bytes = sum(x.size for x in shards) * itemsize
  kv_read = sum(exact_tokens) * tok_bytes
  row = {"tp": tp, "layer_loop": layer_loop, "xla_options": xla_options, "batch": batch,
         "context": context,
         "summaries": None if summaries is None else str(summaries),
         "step_ms_median": 1e3 * float(np.median(times)) if times else None, "steps_timed": len(times),
         "host_ms_median": 1e3 * float(np.median(host)) if host else None, "first_step_s": first_step_s,
         "weight_bytes": weight_bytes, "kv_bytes_read": kv_read,
         "kv_bytes_per_seq": float(np.mean(blocks)) * bs * tok_bytes, "blocks_per_seq": float(np.mean(blocks)),
         "decode_compiles": eng.compiles.decode}
  if args.back_to_back:
    # The same descriptor dispatched N times with no host sync in between: the step time when the
    # host neither waits for tokens nor builds descriptors (what a pipelined loop would reach).
    import jax
    ints, floats = eng.put_descriptor(last["ints"], last["floats"])
    dec = eng.compiled_decode()
    tokens, eng.k_pool, eng.v_pool = dec(eng.state, eng.k_pool, eng.v_pool, ints, floats)
    jax.block_until_ready(tokens)
    t = time.perf_counter()
    for _ in range(args.back_to_back):
      tokens, eng.k_pool, eng.v_pool = dec(eng.state, eng.k_pool, eng.v_pool, ints, floats)
    jax.block_until_ready(tokens)
    row["back_to_back_ms"] = 1e3 * (time.perf_counter() - t) / args.back_to_back
  if args.profile:

    def profiled():
      import jax
      t = time.perf_counter()
      for _ in range(args.profile):
        step()
      jax.block_until_ready((eng.k_pool, eng.v_pool))
      return (time.perf_counter() - t) / args.profile

    try:
      wall_s, timings = bc.kernel_timings(profiled)
      if not timings:
        raise RuntimeError("CUPTI returned no kernel timings")
      prof = aggregate(timings, args.profile, matmul_weight_bytes(eng.state, cfg), copy_tb_s)
      prof["wall_ms_per_step"] = 1e3 * wall_s
    except Exception as e:  # noqa: BLE001
      prof = {"error": str(e)[:300]}
    row["profile"] = prof
  if args.dump_hlo:
    sfx = ("" if summaries is None else "_summaries") + ("_" + re.sub(r"\W+", "_", xla_options) if xla_options else "") \
        + (f"_tp{tp}" if (tp or 1) > 1 else "")
    path = os.path.join(args.dump_hlo, f"decode_{layer_loop}_b{batch}_c{context}{sfx}.hlo.txt")
    row["hlo"] = dump_hlo(eng, path)
  row["decode_compiles"] = eng.compiles.decode
  return row


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
  p.add_argument("--layer-loop", nargs="+", default=["auto"], choices=["auto", "scan", "unroll"],
                 help="RuntimeConfig.layer_loop variants, each run in this process")
  p.add_argument("--tp", type=int, nargs="+", default=[None],
                 help="tensor-parallel mesh sizes, each run in this process (default: no mesh)")
  p.add_argument("--xla-options", nargs="+", default=[""], metavar="NAME=VALUE,...",
                 help="RuntimeConfig.xla_options variants, each run in this process (\"\" = defaults)")
  p.add_argument("--back-to-back", type=int, default=0, metavar="N",
                 help="also time N decode steps dispatched with no host sync between them")
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="after timing, N more decode steps under CUPTI: device time per kernel")
  p.add_argument("--dump-hlo", metavar="DIR", help="save each decode step's optimized HLO here and count "
                 "weight-shaped copy / dynamic-slice fusions")
  p.add_argument("--out-json")
  compile_cache.add_args(p)
  args = p.parse_args(argv)
  try:
    compile_cache.from_args(args)
  except compile_cache.UserError as e:
    p.error(str(e))
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from kvrm_jax.config import ModelConfig
  from kvrm_jax.model import Llama
  from kvrm_jax.summaries import SummaryConfig

  ndev = len(jax.devices())
  for tp in args.tp:
    if tp is not None and tp > ndev:
      p.error(f"--tp {tp} needs {tp} devices; this machine has {ndev} ({jax.default_backend()})")
  cfg = ModelConfig.from_name(args.model)
  model = Llama(cfg, dtype=jnp.dtype(args.dtype), rngs=nnx.Rngs(0))
  bw = copy_bandwidth()
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
          "device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "jax": jax.__version__,
          "model": args.model, "dtype": args.dtype,
          "copy_tb_s": bw, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "matmul_precision": jax.config.jax_default_matmul_precision,
          "command": "python scripts/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  rows = []
  for ctx in args.context:
    for b in args.batches:
      for sc in [None] + [SummaryConfig.parse(s) for s in args.summaries]:
        variants = [(tp, lo, xo) for tp in args.tp for lo in args.layer_loop for xo in args.xla_options]
        for tp, loop, xo in variants:
          try:
            r = run_one(cfg, model, b, ctx, args, sc, loop, bw, xo, tp)
          except Exception as e:  # noqa: BLE001  (e.g. out of memory: keep the other variants' rows)
            r = {"tp": tp, "layer_loop": loop, "xla_options": xo, "batch": b, "context": ctx,
                 "summaries": None if sc is None else str(sc), "error": f"{type(e).__name__}: {str(e)[:500]}"}
          gc.collect()  # the previous engine's pools
          if bw and r.get("step_ms_median"):
            r["roofline_ms"] = 1e3 * (r["weight_bytes"] + r["kv_bytes_read"]) / (bw * 1e12)
            r["vs_roofline"] = r["step_ms_median"] / r["roofline_ms"]
          rows.append(r)
          print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "hlo")}), file=sys.stderr, flush=True)
          if "hlo" in r:
            h = r["hlo"]
            print(f"hlo {loop} b{b} c{ctx}: weight-shaped dynamic-slice {h['dynamic-slice']}, slice {h['slice']}, "
                  f"copy {h['copy']} ({h['in_loop_bodies']} of them in while bodies: x layers at run time), "
                  f"copies of whole [L, ...] stacks {h['stacked_copy']}; "
                  f"slices fused into GEMMs {h['slice_fused_into_gemm']}, dynamic-slice fusions "
                  f"{h['dynamic_slice_fusion']}, while loops (all) {h['while_loops']} -> {h['path']}", file=sys.stderr,
                  flush=True)
          if args.out_json:  # after every row: a later crash or timeout keeps what was measured
            with open(args.out_json, "w") as f:
              json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"{meta['date']}, {meta['device']}, jax {meta['jax']}, {args.model} {args.dtype}, copy ceiling "
        f"{bw and round(bw, 2)} TB/s, XLA_FLAGS={meta['xla_flags'] or '(unset)'}\n`{meta['command']}`\n")
  print("| tp | layer loop | XLA options | batch | context | summaries | step ms (median) | host ms | roofline ms | "
        "step / roofline | KV bytes / seq | first step s | decode compiles |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    xo = r.get("xla_options") or "defaults"
    if "error" in r:
      print(f"| {r.get('tp') or '-'} | {r['layer_loop']} | {xo} | {r['batch']} | {r['context']} | "
            f"{r['summaries'] or 'off'} | error: {r['error'][:200]} | | | | | | |")
      continue
    print(f"| {r.get('tp') or '-'} | {r['layer_loop']} | {xo} | {r['batch']} | {r['context']} | "
          f"{r['summaries'] or 'off'} | {r['step_ms_median'] or float('nan'):.3f} | "
          f"{r['host_ms_median'] or float('nan'):.3f} | {r.get('roofline_ms', float('nan')):.3f} | "
          f"{r.get('vs_roofline', float('nan')):.2f} | "
          f"{r['kv_bytes_per_seq'] / 2**20:.1f} MiB | {r['first_step_s']:.1f} | {r['decode_compiles']} |")
  for r in rows:
    if "profile" in r:
      label = f"{r['layer_loop']} b{r['batch']} c{r['context']}" + (f" {r['summaries']}" if r["summaries"] else "") \
          + (f" [{r['xla_options']}]" if r.get("xla_options") else "") \
          + (f" tp={r['tp']} (CUPTI's kernels of every device)" if (r.get("tp") or 1) > 1 else "")
      print_profile(label, r["profile"], r["step_ms_median"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
