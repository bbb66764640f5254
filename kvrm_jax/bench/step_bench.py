"""End-to-end decode step time against the roofline (weights + KV bytes over measured bandwidth).

B sequences of L tokens each are admitted straight into the pool (their KV is not computed: the
step's cost does not depend on the values), then the engine's own schedule -> descriptor ->
compiled decode step loop runs and each step is timed (dispatch to tokens on the host).

  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048
  python scripts/bench_step.py --model smollm2-135m --batches 64 --context 8192 --summaries sink=1,window=256,max=4
  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 \
      --layer-loop scan unroll --profile 5 --dump-hlo hlo/
  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 64 128 --context 2048 --tp 1 2

--layer-loop runs each variant of RuntimeConfig.layer_loop in the same process (rows labelled);
--tp runs each tensor-parallel mesh size in the same process through jax.shard_map (rows labelled;
without --tp the engine has no mesh; the roofline of a row is one device's share of the bytes);
--xla-options does the same for RuntimeConfig.xla_options ("" = the defaults; decode and --prompt-tokens rows), e.g.
  --xla-options "xla_gpu_enable_triton_gemm=true" "" compares XLA's Triton GEMMs with cuBLAS (the default
  on GPU for bfloat16 steps of 32 rows or more; kvrm_jax/step/steps.py CUBLAS_MIN_ROWS).
--sampling greedy sampled runs each row with greedy decoding and with temperature 0.8, top-p 0.9,
top-k 50 (the cost of sampling); greedy-only runs greedy rows on steps compiled without the branch
between greedy and sampled rows (RuntimeConfig.greedy_only); greedy-branch-free and
sampled-branch-free run those rows on steps that sample with no branch (RuntimeConfig.sampler), and
greedy-window and sampled-window on steps with the window sampler (no branch, no search);
--pipeline also times the engine's pipelined loop (step() calls back to back,
RuntimeConfig.pipeline) beside --back-to-back's device-bound step time.
--profile N runs N more decode steps under CUPTI (as scripts/bench_kernels.py does) and prints the
device time per kernel per step (top 20), coarse buckets (matmul / attention / copies / other), the
weight bandwidth the matmul time implies, and device vs wall time per step.
--prompt-tokens P ... adds rows of steps with prompt work: B decode rows of L tokens plus the last P
tokens of an L-token prompt (attending to the L - P before them), as one mixed step (--modes mixed)
and as a prefill call of that chunk followed by the decode call (--modes split, two syncs), for each
--prompt-attention (gather | kernel). Each replays the same descriptors (the cost depends on shapes
and lengths, not values), dispatch to tokens; its roofline is the larger of the bytes (weights once,
the decode rows' KV, the prompt's history) over the copy ceiling and the FLOPs over the bf16 matmul
rate measured in the same run. --profile N gives their CUPTI breakdown too.
  python scripts/bench_step.py --model llama3-8b --dtype bfloat16 --batches 148 --context 512 2048 \
      --prompt-tokens 512 2048 --prompt-attention gather kernel --profile 3
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

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax import bench as bc
from kvrm_jax.config import PRESETS, ModelConfig, RuntimeConfig, parse_xla_options
from kvrm_jax.engine import Engine
from kvrm_jax.model.llama import random_model
from kvrm_jax.sched.request import SamplingParams
from kvrm_jax.sched.summaries import SummaryConfig
from kvrm_jax.step import gemm, sharding
from kvrm_jax.bench.profile import aggregate, dump_hlo, matmul_weight_bytes, print_profile


def copy_bandwidth() -> float | None:
  """One large device-to-device copy, timed with CUDA events (bytes read + written), TB/s."""
  try:  # imported here, not for a cycle: torch is optional (the `test` extra); None without it
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


# ----------------------------------------------------------------------------- one configuration


SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50)  # --sampling sampled


def _profile(step, n: int, eng, cfg, copy_tb_s) -> dict:
  """n more calls of step() under CUPTI: the per-kernel breakdown per step (or {"error": ...})."""

  def profiled():
    t = time.perf_counter()
    for _ in range(n):
      step()
    jax.block_until_ready((eng.k_pool, eng.v_pool))
    return (time.perf_counter() - t) / n

  try:
    wall_s, timings = bc.kernel_timings(profiled)
    if not timings:
      raise RuntimeError("CUPTI returned no kernel timings")
    prof = aggregate(timings, n, matmul_weight_bytes(eng.state, cfg), copy_tb_s)
    prof["wall_ms_per_step"] = 1e3 * wall_s
  except Exception as e:  # noqa: BLE001
    prof = {"error": str(e)[:300]}
  return prof


def run_one(cfg, model, batch, context, args, summaries=None, layer_loop="scan", copy_tb_s=None,
            xla_options="", tp=None, sampling="greedy", matmul="xla") -> dict:
  """One configuration; tp=None: the engine without a mesh, tp=N: jax.shard_map over N devices."""

  bs = 16
  # With summaries, time only the steady state: once the prompt's far history has been folded.
  fold_steps = 0 if summaries is None else context // bs // max(1, summaries.max_entries) + 10
  steps = args.warmup + args.iters + fold_steps
  extra = args.profile + (2 * args.iters + 4 if args.pipeline else 0) + 2
  mb = -(-(context + steps + extra) // bs)
  rt = RuntimeConfig(block_size=bs, num_blocks=batch * (mb + 2) + 1, max_slots=batch, max_blocks_per_seq=mb,
                     prefill_buckets=(64,), dtype=args.dtype, attention=args.attention,
                     max_folds=4 * batch if summaries else 8, layer_loop=layer_loop,
                     max_summaries=summaries.max_entries if summaries else 0,
                     xla_options=parse_xla_options(xla_options), pipeline=args.pipeline, matmul=matmul,
                     greedy_only=sampling == "greedy-only",
                     sampler=("branch-free" if sampling.endswith("branch-free")
                              else "window" if sampling.endswith("window") else "branch"))
  mesh = None if tp is None else sharding.make_mesh(tp)
  eng = Engine(cfg, model, rt, summaries=summaries, mesh=mesh)
  rng = np.random.default_rng(0)
  for i in range(batch):
    eng.add_request(rng.integers(3, cfg.vocab_size, context).tolist(),
                    SamplingParams(max_new_tokens=steps + extra, ignore_eos=True, seed=i,
                                   **(SAMPLED if sampling.startswith("sampled") else {})))
  eng.sched.admit()
  for req in list(eng.sched.slots.reqs):  # stand in for the prefill: the prompts' KV is "computed"
    req.num_computed = req.prefill_target
    req.output_ids.append(int(rng.integers(3, cfg.vocab_size)))
    eng.sched.slots.mark_running(req)
  last = {}

  def step():
    t0 = time.perf_counter()
    plan = eng.schedule()
    ints, floats = eng.build_decode_descriptor(plan)
    t1 = time.perf_counter()
    tokens, eng.k_pool, eng.v_pool = eng.compiled_decode()(eng.state, eng.k_pool, eng.v_pool,
                                                           *eng.put_descriptor(ints, floats), *eng.decode_args())
    tok = np.asarray(tokens)
    t2 = time.perf_counter()
    eng.sched.finish_decode(plan, tok, t2, {})
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
  sl = eng.sched.slots
  exact_tokens = [r.num_computed - int(sl.folded[r.slot]) for r in sl.reqs]
  blocks = [len(eng.sched.allocator.block_table(r.id)) + int(sl.sum_base[r.slot] >= 0) for r in sl.reqs]
  shards = [x.addressable_shards[0].data for x in jax.tree.leaves(eng.state)]  # one device's
  weight_bytes = sum(x.size for x in shards) * itemsize
  kv_read = sum(exact_tokens) * tok_bytes
  row = {"tp": tp, "layer_loop": layer_loop, "xla_options": xla_options, "matmul": matmul, "batch": batch,
         "context": context, "sampling": sampling,
         "summaries": None if summaries is None else str(summaries),
         "step_ms_median": 1e3 * float(np.median(times)) if times else None, "steps_timed": len(times),
         "host_ms_median": 1e3 * float(np.median(host)) if host else None, "first_step_s": first_step_s,
         "weight_bytes": weight_bytes, "kv_bytes_read": kv_read,
         "kv_bytes_per_seq": float(np.mean(blocks)) * bs * tok_bytes, "blocks_per_seq": float(np.mean(blocks)),
         "decode_compiles": eng.compiles.decode}
  if args.back_to_back:
    # The same descriptor dispatched N times with no host sync in between: the step time when the
    # host neither waits for tokens nor builds descriptors (what a pipelined loop would reach).
    ints, floats = eng.put_descriptor(last["ints"], last["floats"])
    dec = eng.compiled_decode()
    tokens, eng.k_pool, eng.v_pool = dec(eng.state, eng.k_pool, eng.v_pool, ints, floats, *eng.decode_args())
    jax.block_until_ready(tokens)
    t, calls = time.perf_counter(), []
    for _ in range(args.back_to_back):
      tc = time.perf_counter()
      tokens, eng.k_pool, eng.v_pool = dec(eng.state, eng.k_pool, eng.v_pool, ints, floats, *eng.decode_args())
      calls.append(time.perf_counter() - tc)
    jax.block_until_ready(tokens)
    row["back_to_back_ms"] = 1e3 * (time.perf_counter() - t) / args.back_to_back
    # Host time inside one call of the compiled step before it returns (launching its kernels): near
    # back_to_back_ms means the loop is bound by launches, not by the device.
    row["dispatch_ms_median"] = 1e3 * float(np.median(calls))
  if args.pipeline and summaries is None:
    # The engine's own loop with RuntimeConfig.pipeline: each step() dispatches the next decode step,
    # then reads the previous one's tokens (host work hidden behind the device's).
    for _ in range(3):
      eng.step()
    ts = []
    for _ in range(args.iters):
      t = time.perf_counter()
      eng.step()
      ts.append(time.perf_counter() - t)
    row["pipelined_ms_median"] = 1e3 * float(np.median(ts))
    row["pipelined_steps"] = eng.stats.pipelined_steps
    eng.flush()  # the step in flight, before the timings below
  if args.profile:
    row["profile"] = _profile(step, args.profile, eng, cfg, copy_tb_s)
  if args.dump_hlo:
    sfx = ("" if summaries is None else "_summaries") + ("_" + re.sub(r"\W+", "_", xla_options) if xla_options else "") \
        + (f"_tp{tp}" if (tp or 1) > 1 else "")
    path = os.path.join(args.dump_hlo, f"decode_{layer_loop}_b{batch}_c{context}{sfx}.hlo.txt")
    row["hlo"] = dump_hlo(eng, path)
  row["decode_compiles"] = eng.compiles.decode
  return row


def _prompt_cost(cfg, batch: int, context: int, prompt_tokens: int, tok_bytes: int) -> tuple[float, float]:
  """(FLOPs, KV bytes) of a step that computes the last `prompt_tokens` of a `context`-token prompt
  beside `batch` decode rows of `context` tokens: every row's matmuls, the chunk's causal attention
  over its history, the LM head per sampled row; the decode rows' KV and the prompt's history read once."""
  keys = np.arange(context - prompt_tokens + 1, context + 1, dtype=np.float64)  # keys each chunk token sees
  flops = bc.engines.layer_flops_per_token(cfg) * (prompt_tokens + batch) \
      + bc.engines.attention_flops_per_key(cfg) * keys.sum() + 2 * cfg.hidden_size * cfg.vocab_size * (batch + 1)
  return float(flops), float((batch + 1) * context * tok_bytes)


def run_prompt(cfg, model, batch, context, prompt_tokens, mode, prompt_attention, args, copy_tb_s=None,
               mm_tflops=None, xla_options: str = "") -> dict:
  """A step with prompt work (see --prompt-tokens): mode "mixed" (one mixed step) or "split" (a
  prefill call, then the decode call); the same descriptors replayed args.iters times."""
  from kvrm_jax import descriptor as desc_lib
  bs, tile, slots = 16, 64, batch + 1
  if prompt_tokens > context:
    raise ValueError(f"--prompt-tokens {prompt_tokens} > --context {context}")
  mb = -(-(context + 2) // bs)
  kw = (dict(step_tokens=slots + -(-prompt_tokens // tile) * tile, tile=tile) if mode == "mixed"
        else dict(prefill_buckets=(prompt_tokens,), max_prefill_seqs=1))
  rt = RuntimeConfig(block_size=bs, num_blocks=slots * (mb + 2) + 1, max_slots=slots, max_blocks_per_seq=mb,
                     dtype=args.dtype, attention=args.attention, prompt_attention=prompt_attention,
                     xla_options=parse_xla_options(xla_options), **kw)
  eng = Engine(cfg, model, rt)
  rng = np.random.default_rng(0)
  for _ in range(slots):
    eng.add_request(rng.integers(3, cfg.vocab_size, context).tolist(), SamplingParams(max_new_tokens=4, ignore_eos=True))
  eng.sched.admit()
  *running, prompt = list(eng.sched.slots.reqs)
  for req in running:  # stand in for their prefill (as run_one)
    req.num_computed = req.prefill_target
    req.output_ids.append(int(rng.integers(3, cfg.vocab_size)))
    eng.sched.slots.mark_running(req)
  prompt.num_computed = context - prompt_tokens  # its history is "computed"; this step computes the rest
  plan = eng.schedule()
  assert [(r.id, s, n) for r, s, n in plan.prefill_rows] == [(prompt.id, context - prompt_tokens, prompt_tokens)]
  sl = eng.sched.slots
  t0 = time.perf_counter()
  if mode == "mixed":
    n_tiles, (ints, floats), _ = desc_lib.build_mixed(rt, plan.prefill_rows, sl, plan.decode_slots)
    calls = [(eng._mixed_exe(n_tiles), ints, floats, eng.decode_host_args())]
  else:
    chunk, (pi, pf) = desc_lib.build_prefill(rt, plan.prefill_rows, sl, [], [])
    di, df = eng.build_decode_descriptor(plan, [], [])
    calls = [(eng._prefill_exe(chunk), pi, pf, ()), (eng.compiled_decode(), di, df, eng.decode_args())]

  def step():
    for exe, ints, floats, extra in calls:
      tokens, eng.k_pool, eng.v_pool = exe(eng.state, eng.k_pool, eng.v_pool, *eng.put_descriptor(ints, floats),
                                           *extra)[:3]
      np.asarray(tokens)  # each call's sync, as the engine's step

  step()
  first_step_s = time.perf_counter() - t0  # compile + one step
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.iters):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  itemsize = 2 if args.dtype == "bfloat16" else 4
  tok_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
  weight_bytes = sum(x.size for x in jax.tree.leaves(eng.state)) * itemsize
  flops, kv_bytes = _prompt_cost(cfg, batch, context, prompt_tokens, tok_bytes)
  step_ms = 1e3 * float(np.median(times))
  row = {"mode": mode, "prompt_attention": prompt_attention, "xla_options": xla_options, "batch": batch,
         "context": context,
         "prompt_tokens": prompt_tokens, "step_ms_median": step_ms, "steps_timed": len(times),
         "first_step_s": first_step_s, "weight_bytes": weight_bytes, "kv_bytes_read": kv_bytes, "flops": flops,
         "prompt_tokens_per_s": prompt_tokens / (step_ms / 1e3),
         "compiles": {"decode": eng.compiles.decode, "prefill": eng.compiles.prefill, "mixed": eng.compiles.mixed}}
  if copy_tb_s:
    row["memory_ms"] = 1e3 * (weight_bytes + kv_bytes) / (copy_tb_s * 1e12)
  if mm_tflops:
    row["compute_ms"] = 1e3 * flops / (mm_tflops * 1e12)
  if row.get("memory_ms") or row.get("compute_ms"):
    row["roofline_ms"] = max(row.get("memory_ms") or 0.0, row.get("compute_ms") or 0.0)
    row["vs_roofline"] = step_ms / row["roofline_ms"]
  if args.profile:
    row["profile"] = _profile(step, args.profile, eng, cfg, copy_tb_s)
  return row


def _num(v, digits: int) -> str:
  """A table cell: "-" where a row has no such number (no roofline off a GPU, say)."""
  return "-" if v is None or v != v else f"{v:.{digits}f}"


def _print_prompt_rows(rows) -> None:
  print("\nSteps with prompt work (B decode rows + the last P tokens of an L-token prompt):\n")
  print("| mode | prompt attention | batch | context | prompt tokens | step ms (median) | memory ms | compute ms | "
        "step / roofline | prompt tok/s | first step s | compiles |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    pa = r["prompt_attention"] + (f" ({r['xla_options']})" if r.get("xla_options") else "")
    head = f"| {r['mode']} | {pa} | {r['batch']} | {r['context']} | {r['prompt_tokens']} |"
    if "error" in r:
      print(f"{head} error: {r['error'][:200]} | | | | | | |")
      continue
    c = r["compiles"]
    print(f"{head} {r['step_ms_median']:.3f} | {_num(r.get('memory_ms'), 3)} | {_num(r.get('compute_ms'), 3)} | "
          f"{_num(r.get('vs_roofline'), 2)} | {r['prompt_tokens_per_s']:,.0f} | {r['first_step_s']:.1f} | "
          f"decode {c['decode']}, prefill {c['prefill']}, mixed {c['mixed']} |")
  for r in rows:
    if "profile" in r:
      label = " ".join(x for x in (r["mode"], r["prompt_attention"], r.get("xla_options"), f"b{r['batch']}",
                                   f"c{r['context']}", f"p{r['prompt_tokens']}") if x)
      print_profile(label, r["profile"], r["step_ms_median"])


def check_sizes(p: argparse.ArgumentParser, args, cfg: ModelConfig) -> None:
  """Counts and lengths that no row could run with: one argparse error line now, not a table of
  failed rows later."""
  for flag, values, low in (("--batches", args.batches, 1), ("--context", args.context, 1),
                            ("--prompt-tokens", args.prompt_tokens, 1), ("--iters", [args.iters], 1),
                            ("--warmup", [args.warmup], 0), ("--back-to-back", [args.back_to_back], 0),
                            ("--profile", [args.profile], 0)):
    bad = [v for v in values if v < low]
    if bad:
      p.error(f"{flag} must be >= {low}, got {bad[0]}")
  if args.prompt_tokens and min(args.prompt_tokens) > max(args.context):
    p.error(f"--prompt-tokens {min(args.prompt_tokens)} exceeds every --context (at most {max(args.context)}): "
            "a step computes the last P tokens of an L-token prompt")
  decoded = args.warmup + args.iters + args.profile + (2 * args.iters + 4 if args.pipeline else 0) + 2
  if max(args.context) + decoded > cfg.max_position:
    p.error(f"--context {max(args.context)} plus the {decoded} tokens the run decodes exceeds the "
            f"{args.model} model's context of {cfg.max_position} tokens")
  if "skinny" in args.matmul:
    try:
      gemm.check(RuntimeConfig(matmul="skinny"))
    except ValueError as e:
      p.error(f"--matmul skinny: {e}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="llama3-8b", choices=sorted(PRESETS))
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
  p.add_argument("--matmul", nargs="+", default=["xla"], choices=["xla", "skinny"],
                 help="RuntimeConfig.matmul variants (who runs the projection GEMMs), each run in this process")
  p.add_argument("--back-to-back", type=int, default=0, metavar="N",
                 help="also time N decode steps dispatched with no host sync between them, and the host time "
                      "one call of the step takes before it returns (dispatch ms)")
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="after timing, N more decode steps under CUPTI: device time per kernel")
  p.add_argument("--dump-hlo", metavar="DIR", help="save each decode step's optimized HLO here and count "
                 "weight-shaped copy / dynamic-slice fusions")
  p.add_argument("--sampling", nargs="+", default=["greedy"],
                 choices=["greedy", "sampled", "greedy-only", "greedy-branch-free", "sampled-branch-free",
                          "greedy-window", "sampled-window"],
                 help="decode rows' sampling variants: greedy, sampled (temperature 0.8, top-p 0.9, top-k 50), "
                 "greedy-only (greedy rows, steps compiled with RuntimeConfig.greedy_only), *-branch-free and "
                 "*-window (those rows on steps with RuntimeConfig.sampler 'branch-free' or 'window')")
  p.add_argument("--pipeline", action="store_true",
                 help="also time the engine's pipelined loop (RuntimeConfig.pipeline): step() calls back to back")
  p.add_argument("--prompt-tokens", type=int, nargs="+", default=[], metavar="P",
                 help="also time steps with P prompt tokens beside the decode rows (see above)")
  p.add_argument("--modes", nargs="+", default=["mixed", "split"], choices=["mixed", "split"],
                 help="with --prompt-tokens: one mixed step, or a prefill call then the decode call")
  p.add_argument("--prompt-attention", nargs="+", default=["auto"], choices=["auto", "gather", "kernel"],
                 help="with --prompt-tokens: RuntimeConfig.prompt_attention variants")
  p.add_argument("--out-json")
  bc.compile_cache.add_args(p)
  args = p.parse_args(argv)
  try:
    bc.compile_cache.from_args(args)
    bc.check_outputs(args.out_json)
  except bc.UserError as e:
    p.error(str(e))
  cfg = ModelConfig.from_name(args.model)
  check_sizes(p, args, cfg)
  ndev = len(jax.devices())
  for tp in args.tp:
    if tp is not None and tp > ndev:
      p.error(f"--tp {tp} needs {tp} devices; this machine has {ndev} ({jax.default_backend()})")
  model = random_model(cfg, jnp.dtype(args.dtype))
  bw = copy_bandwidth()
  mm = bc.matmul_tflops(args.dtype) if args.prompt_tokens else None
  meta = {"matmul_tflops": mm, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
          "device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "jax": jax.__version__,
          "model": args.model, "dtype": args.dtype,
          "copy_tb_s": bw, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "matmul_precision": jax.config.jax_default_matmul_precision,
          "command": "python scripts/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
  rows = []
  for ctx in args.context:
    for b in args.batches:
      for sc in [None] + [SummaryConfig.parse(s) for s in args.summaries]:
        variants = [(tp, lo, xo, sa, mm_) for tp in args.tp for lo in args.layer_loop for xo in args.xla_options
                    for sa in args.sampling for mm_ in args.matmul]
        for tp, loop, xo, sa, mm_ in variants:
          try:
            r = run_one(cfg, model, b, ctx, args, sc, loop, bw, xo, tp, sa, mm_)
          except Exception as e:  # noqa: BLE001  (e.g. out of memory: keep the other variants' rows)
            r = {"tp": tp, "layer_loop": loop, "xla_options": xo, "matmul": mm_, "batch": b, "context": ctx,
                 "sampling": sa,
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
  prompt_rows = []
  for ctx in args.context:
    for b in args.batches:
      for pt in args.prompt_tokens:
        for mode in args.modes:
          for pa, xo in [(pa, xo) for pa in args.prompt_attention for xo in args.xla_options]:
            try:
              r = run_prompt(cfg, model, b, ctx, pt, mode, pa, args, bw, mm, xo)
            except Exception as e:  # noqa: BLE001
              r = {"mode": mode, "prompt_attention": pa, "xla_options": xo, "batch": b, "context": ctx,
                   "prompt_tokens": pt, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            gc.collect()
            prompt_rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "profile"}), file=sys.stderr, flush=True)
            if args.out_json:
              with open(args.out_json, "w") as f:
                json.dump({"meta": meta, "rows": rows, "prompt_rows": prompt_rows}, f, indent=1)
  print(f"{meta['date']}, {meta['device']}, jax {meta['jax']}, {args.model} {args.dtype}, copy ceiling "
        + (f"{bw:.2f} TB/s" if bw else "not measured (no CUDA device for torch)")
        + f", XLA_FLAGS={meta['xla_flags'] or '(unset)'}"
        + (f", matmul {mm:.1f} TFLOP/s" if mm else "") + f"\n`{meta['command']}`\n")
  print("| tp | layer loop | XLA options | GEMMs | batch | context | summaries | sampling | step ms (median) | "
        "host ms | roofline ms | step / roofline | back-to-back ms | dispatch ms | pipelined ms | KV bytes / seq | "
        "first step s | decode compiles |")
  print("| --- " * 18 + "|")
  for r in rows:
    xo = r.get("xla_options") or "defaults"
    head = (f"| {r.get('tp') or '-'} | {r['layer_loop']} | {xo} | {r.get('matmul', 'xla')} | {r['batch']} | "
            f"{r['context']} | {r['summaries'] or 'off'} | {r.get('sampling', 'greedy')} |")
    if "error" in r:
      print(f"{head} error: {r['error'][:200]} |" + " |" * 9)
      continue
    print(f"{head} {_num(r['step_ms_median'], 3)} | {_num(r['host_ms_median'], 3)} | "
          f"{_num(r.get('roofline_ms'), 3)} | {_num(r.get('vs_roofline'), 2)} | {_num(r.get('back_to_back_ms'), 3)} | "
          f"{_num(r.get('dispatch_ms_median'), 3)} | {_num(r.get('pipelined_ms_median'), 3)} | "
          f"{r['kv_bytes_per_seq'] / 2**20:.1f} MiB | "
          f"{r['first_step_s']:.1f} | {r['decode_compiles']} |")
  for r in rows:
    if "profile" in r:
      label = f"{r['layer_loop']} b{r['batch']} c{r['context']}" + (f" {r['summaries']}" if r["summaries"] else "") \
          + (f" {r['sampling']}" if r.get("sampling", "greedy") != "greedy" else "") \
          + (f" [{r['xla_options']}]" if r.get("xla_options") else "") \
          + (f" matmul={r['matmul']}" if r.get("matmul", "xla") != "xla" else "") \
          + (f" tp={r['tp']} (CUPTI's kernels of every device)" if (r.get("tp") or 1) > 1 else "")
      print_profile(label, r["profile"], r["step_ms_median"])
  if prompt_rows:
    _print_prompt_rows(prompt_rows)
  return 0

