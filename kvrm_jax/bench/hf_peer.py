"""HF transformers peer: bench_decode's requests through transformers' continuous batching (paged KV).

  python scripts/bench_hf_peer.py --model tiny --families mixed --num-requests 8
  python scripts/bench_hf_peer.py --model llama3-8b --dtype bfloat16 --kv-budget-gb 20 --max-len 4096 \\
      --families mixed --num-requests 256 --max-wall 75 --out-json out.json --report docs/results.md \\
      --compare-json docs/raw/decode_h100_llama3-8b.json
  python scripts/bench_hf_peer.py --from-json out.json --report docs/results.md

The model is a `transformers.LlamaForCausalLM` with random weights in the shape of one of our presets.
The requests are bench_decode's (its `make_workload`, seeded the same way: the same --seed and the same
--families order give the same prompts and forced output lengths), all added at t=0 to one
`ContinuousBatchingManager` (`model.init_continuous_batching`), each with its own `max_new_tokens` and EOS
off, so HF generates exactly the tokens our engines do. HF's paged cache gets the KV budget our scripts
give each engine: `num_blocks` = budget blocks of `--block-size` tokens.

Metrics come from HF's per-request records (`record_timestamps=True`): a host timestamp per generated
token, the admission and finish times. Per-step times, reserved/live KV over time, preemptions and host
overhead are not exposed by HF and are written as null. `--compare-json` puts the rows of a bench_decode
raw JSON (same model, budget and requests, checked) beside HF's in the report.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import sys
import time

import numpy as np

from kvrm_jax import bench as bc
from kvrm_jax.bench.hf_report import ENGINE, compare_excerpt, fmt_bytes, print_summary, read_compare, render
from kvrm_jax.bench.hf_setup import (HF, attn_request, build_model, environment, load_hf, model_info, one_line,
                                     pick_device)
from kvrm_jax.config import ModelConfig

KIND = "bench_hf_peer"
MODELS = ("tiny", "smollm2-135m", "llama3-8b")
ATTNS = ("sdpa", "eager", "auto", "flash_attention_2", "flash_attention_3")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  w = p.add_argument_group("workload (bench_decode's)")
  w.add_argument("--families", "--family", default="mixed", help=f"comma list of {', '.join(bc.FAMILIES)}")
  w.add_argument("--num-requests", type=int, default=48, help="requests per family")
  w.add_argument("--max-wall", type=float, default=None,
                 help="stop a run after this many seconds (its unfinished requests are counted as such)")
  g = p.add_argument_group("model and KV budget")
  g.add_argument("--model", default="tiny", choices=MODELS, help="preset shape, random weights")
  g.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="default: bfloat16 on CUDA, float32 on CPU")
  g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cuda | cuda:N | cpu")
  bc.add_budget_args(g, max_len=None, block_help="tokens per KV block (HF's block / page size)",
                     max_len_help="per-sequence context limit the workload is shaped by",
                     blocks_help="HF's num_blocks (KV pool size in blocks)")
  h = p.add_argument_group("HF continuous batching")
  h.add_argument("--attn", default="sdpa", choices=ATTNS,
                 help="sdpa: HF's paged SDPA path, kept even where flash-attn is installed; eager: paged|eager; "
                      "auto: HF's own choice (flash attention if available, else SDPA); flash_attention_N: that one")
  h.add_argument("--max-batch-tokens", type=int, default=8192,
                 help="tokens per forward pass, prefill chunks and decode rows together (HF's default, 8192)")
  h.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"),
                 help="HF's use_cuda_graph (auto: HF decides; off with a masked attention like sdpa)")
  h.add_argument("--no-prefix-sharing", action="store_true", help="allow_block_sharing=False (default: HF's True)")
  o = bc.add_output_args(p, seed_help="workload seed (as bench_decode's) and weight init seed", label_stem="hfpeer")
  o.add_argument("--compare-json", help="a bench_decode raw JSON whose engines to show beside HF in the report")
  bc.compile_cache.add_args(p)
  return p.parse_args(argv)


def plan_budget(cfg, args, dtype: str) -> bc.Budget:
  """bench_decode's plan (same max_len rounding, same budget in blocks); only its blocks matter here."""
  ns = argparse.Namespace(block_size=args.block_size, max_len=args.max_len, kv_budget_blocks=args.kv_budget_blocks,
                          kv_budget_gb=args.kv_budget_gb, slot_factor=1.0, kvrm_slots=None)
  return bc.plan_budget(cfg, ns, dtype)


def workloads(families: list[str], n: int, max_len: int, vocab: int, seed: int) -> dict:
  """bench_decode's requests: family i of --families draws from default_rng([seed, i])."""
  return {f: bc.make_workload(f, n, max_len, vocab, np.random.default_rng([seed, i])) for i, f in enumerate(families)}


# ----------------------------------------------------------------------------- the manager


def make_manager(hf: HF, model, work, budget: bc.Budget, args, cb_extra: dict):
  """A ContinuousBatchingManager sized to the KV budget, warmed up (its cache allocated), not started."""
  gen_cfg = hf.transformers.GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in work), eos_token_id=-1)
  kw = {hf.size_field: budget.block_size, "num_blocks": budget.budget_blocks, "max_batch_tokens": args.max_batch_tokens,
        **cb_extra}
  if args.cuda_graph != "auto":
    kw["use_cuda_graph"] = args.cuda_graph == "on"
  if args.no_prefix_sharing:
    kw["allow_block_sharing"] = False
  if args.attn not in ("sdpa", "eager") and budget.block_size % 256:
    kw["max_blocks_per_request"] = 0  # flash_attn_with_kvcache (the decode path) wants 256-token pages: varlen only
  init_kw = {"generation_config": gen_cfg, "continuous_batching_config": hf.cb_config_cls(**kw)}
  if hf.hints_cls is not None and "workload_hints" in inspect.signature(model.init_continuous_batching).parameters:
    init_kw["workload_hints"] = hf.hints_cls(max_prompt_length=max(len(p) for p, _ in work),
                                             max_generated_length=max(n for _, n in work), num_requests=len(work))
  try:
    mgr = model.init_continuous_batching(**init_kw)
    mgr.warmup()  # allocates the paged cache (and captures CUDA graphs where HF uses them)
  except (MemoryError, ValueError) as e:
    raise bc.UserError(f"HF continuous batching rejected this configuration: {one_line(e)}") from None
  return mgr


def manager_record(hf: HF, mgr, model, budget: bc.Budget, attn: str, warmup_s: float) -> dict:
  """What HF resolved: attention, cache size (measured from its tensors), batching options."""
  cache = getattr(getattr(mgr, "batch_processor", None), "cache", None)
  cb = getattr(mgr, "continuous_batching_config", None)
  simple = (bool, int, float, str, type(None))
  resolved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(cb).items())
              if isinstance(v, simple) or (isinstance(v, tuple) and all(isinstance(x, simple) for x in v))} if cb else {}
  return {"transformers": hf.transformers.__version__, "attn_requested": attn,
          "attn_resolved": model.config._attn_implementation, "num_blocks": getattr(cache, "num_blocks", None),
          "block_size": budget.block_size, "max_batch_tokens": getattr(cache, "max_batch_tokens", None),
          "kv_cache_bytes": kv_cache_bytes(hf, cache), "kv_budget_bytes": budget.budget_bytes,
          "continuous_batching_config": resolved, "warmup_s": warmup_s}


def kv_cache_bytes(hf: HF, cache) -> int | None:
  """Bytes of the paged cache tensors HF allocated (trash blocks included), or None if not found."""
  if cache is None:
    return None
  t = getattr(cache, "cache_tensor", None)  # later 5.x: one byte pool
  if isinstance(t, hf.torch.Tensor):
    return t.numel() * t.element_size()
  ts = list(getattr(cache, "key_cache", None) or []) + list(getattr(cache, "value_cache", None) or [])
  return sum(x.numel() * x.element_size() for x in ts) or None  # 5.17: one K and one V tensor per layer


def add(mgr, prompt, n: int, rid: str) -> str | None:
  return mgr.add_request(prompt, request_id=rid, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)


def collect(mgr, pending: set, outs: dict, deadline: float, bar=None) -> bool:
  """Take results until `pending` is empty (True), the deadline passes or the loop dies (False)."""
  while pending:
    left = deadline - time.perf_counter()
    if left <= 0:
      return False
    r = mgr.get_result(timeout=min(0.2, left))
    if r is None:
      if not mgr.is_running():
        return False
      continue
    if r.request_id in pending and r.is_finished():
      outs[r.request_id] = r
      pending.discard(r.request_id)
      if bar is not None:
        bar.update(len(r.generated_tokens))
  return True


def warm_up(mgr, max_len: int, max_batch_tokens: int, vocab: int) -> float:
  """A few short requests with prompts of 16..1024 tokens, untimed (kernel selection, allocator, first batches)."""
  t0 = time.perf_counter()
  rng = np.random.default_rng(12345)
  lens = sorted({min(k, max_len - 2, max_batch_tokens) for k in (16, 64, 256, 1024)} - {0})
  pending = {add(mgr, rng.integers(3, vocab, k).tolist(), 2, f"warmup-{i}") for i, k in enumerate(lens)}
  outs = {}
  if not collect(mgr, pending - {None}, outs, time.perf_counter() + 600):
    raise RuntimeError("HF continuous batching did not finish its warm-up requests")
  bad = [o.error for o in outs.values() if o.error]
  if bad:
    raise RuntimeError(f"HF continuous batching failed its warm-up: {bad[0]}")
  return time.perf_counter() - t0


def shutdown(hf: HF, mgr, hard: bool) -> None:
  """Stop the generation thread (hard: fail what is left now, else let it finish)."""
  if hard and hf.hard_stop:
    mgr.stop(block=True, timeout=60, hard_stop=True)
  else:
    mgr.stop(block=True, timeout=60)


def run_family(hf: HF, mgr, work, desc: str, args, device) -> dict:
  """Add every request at t=0, take results until all are done or --max-wall; metrics of this run."""
  torch = hf.torch
  cuda = device.type == "cuda"
  bar = bc.progress_bar(sum(n for _, n in work), desc, args.quiet)
  if cuda:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
  steps0 = getattr(mgr, "current_batch", None)
  t0 = time.perf_counter()
  forced, rejected = {}, 0
  for i, (prompt, n) in enumerate(work):
    rid = add(mgr, prompt, n, f"req-{i}")
    if rid is None:
      rejected += 1
    else:
      forced[rid] = n
  outs = {}
  deadline = t0 + args.max_wall if args.max_wall else math.inf
  all_done = collect(mgr, set(forced), outs, deadline, bar)
  t_end = time.perf_counter()
  steps1 = getattr(mgr, "current_batch", None)
  if bar is not None:
    bar.close()
  if not all_done and not hf.hard_stop:
    for rid in set(forced) - set(outs):
      mgr.cancel_request(rid)
  shutdown(hf, mgr, hard=not all_done)
  while (r := mgr.get_result(timeout=0.05)) is not None:  # what the stop failed or cut short
    if r.request_id in forced and r.request_id not in outs and r.is_finished():
      outs[r.request_id] = r
  m = metrics(outs, forced, rejected, t0, t_end)
  m["steps"] = steps1 - steps0 if isinstance(steps0, int) and isinstance(steps1, int) else None
  m["cut_by_max_wall"] = not all_done and t_end >= deadline
  m["gpu_memory"] = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                     "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None}
  return m


def metrics(outs: dict, forced: dict, rejected: int, t0: float, t_end: float) -> dict:
  """bench_decode's run metrics from HF's records (times relative to t0 = every request's arrival).

  A request counts as completed if HF finished it by t_end; tokens, TTFT and ITL count only the
  tokens stamped by t_end (a --max-wall cut leaves partial outputs). What HF does not expose is null.
  """
  done, ttft, queue, e2e, itl, gen, mismatch, errors = [], [], [], [], [], 0, 0, []
  for rid, n in forced.items():
    o = outs.get(rid)
    if o is None:
      continue
    ts = np.array([t for t in (o.timestamps or []) if t <= t_end])
    gen += len(ts)
    if len(ts):
      ttft.append((ts[0] - t0) * 1e3)
      itl.append(np.diff(ts) * 1e3)
    if 0 < o.lifespan[0] <= t_end:
      queue.append((o.lifespan[0] - t0) * 1e3)
    ok = o.error is None and o.status.name == "FINISHED" and 0 < o.lifespan[1] <= t_end
    if ok:
      done.append(rid)
      e2e.append((o.lifespan[1] - t0) * 1e3)
      mismatch += len(o.generated_tokens) != n
    elif o.error and o.error not in errors:
      errors.append(o.error)
  itl = np.concatenate(itl) if itl else np.zeros(0)
  wall = max(t_end - t0, 1e-9)
  n_req = len(forced) + rejected
  return {
      "requests": n_req, "completed": len(done), "rejected": rejected, "unfinished": len(forced) - len(done),
      "not_added": 0, "generated_tokens": gen, "wall_s": wall, "tokens_per_s": gen / wall,
      "ttft_ms": bc.pct(ttft, (50, 90, 99)), "queue_ms": bc.pct(queue, (50, 99, 100)), "e2e_ms": bc.pct(e2e, (50, 99)),
      "itl_ms": bc.pct(itl, (50, 90, 99, 100)), "itl_p99_over_p50": bc.ratio_of(bc.pct(itl, (99,)), bc.pct(itl, (50,))),
      "itl_cdf_ms": bc.cdf(itl), "length_mismatches": mismatch, "errors": errors[:3],
      # Not exposed by HF's continuous batching API: null, never estimated.
      "step_ms": None, "spikes": None, "mean_decode_batch": None, "preemptions": None, "prefix_hit_blocks": None,
      "host_us": None,
      "kv": {"peak_reserved_bytes": None, "peak_live_bytes": None, "peak_ratio": None, "mean_ratio": None},
  }


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
  return bc.report_main(argv, parse_args, KIND, render, print_summary, _run)


def _run(args, argv) -> int:
  bc.compile_cache.from_args(args)
  families = bc.family_args(args)
  if args.max_batch_tokens < 1:
    raise bc.UserError("--max-batch-tokens must be >= 1")
  compare = read_compare(args.compare_json) if args.compare_json else None
  cfg = ModelConfig.from_name(args.model)
  hf = load_hf()
  device = pick_device(hf, args.device)
  dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
  budget = plan_budget(cfg, args, dtype)
  work = workloads(families, args.num_requests, budget.max_len, cfg.vocab_size, args.seed)
  attn, cb_extra = attn_request(hf, args.attn)
  env = environment(hf, device)

  t_init = time.perf_counter()
  model = build_model(hf, cfg, dtype, device, attn, args.seed)
  t_init = time.perf_counter() - t_init
  print(f"[bench_hf_peer] {env['device']} | {args.model} {dtype} | transformers {env['transformers']}, torch "
        f"{env['torch']} | HF num_blocks {budget.budget_blocks} x {budget.block_size} tokens "
        f"({budget.budget_bytes / 1e9:.3g} GB), max_len {budget.max_len}, max_batch_tokens {args.max_batch_tokens} | "
        f"model init {t_init:.1f} s", flush=True)
  results, engines = {}, {}
  for fam in families:
    mgr = make_manager(hf, model, work[fam], budget, args, cb_extra)
    try:
      mgr.start()
      warm = warm_up(mgr, budget.max_len, args.max_batch_tokens, cfg.vocab_size)
      rec = manager_record(hf, mgr, model, budget, attn, warm)
      m = run_family(hf, mgr, work[fam], f"{ENGINE}/{fam}", args, device)
    finally:
      if mgr.is_running():
        shutdown(hf, mgr, hard=True)
      if hasattr(mgr, "destroy"):
        mgr.destroy()
      del mgr
      free_memory(hf, device)
    results[fam] = {ENGINE: m}
    engines[fam] = rec
    print(f"[{ENGINE}/{fam}] attention {rec['attn_resolved']}, KV cache {fmt_bytes(rec['kv_cache_bytes'])}, warm-up "
          f"{warm:.1f} s | {m['completed']}/{m['requests']} done, {m['tokens_per_s']:.1f} tok/s, TTFT p50 "
          f"{bc.fmt(m['ttft_ms']['p50'])} ms, ITL p50 {bc.fmt(m['itl_ms']['p50'])} ms p99 "
          f"{bc.fmt(m['itl_ms']['p99'])} ms, {m['steps']} forward passes"
          + (", cut by --max-wall" if m["cut_by_max_wall"] else ""), flush=True)
    for e in [] if m["cut_by_max_wall"] else m["errors"]:
      print(f"[{ENGINE}/{fam}] request error: {e}", file=sys.stderr)

  obj = {"kind": KIND, "label": args.label or bc.default_label("hfpeer", env, args.model),
         "note": bc.default_note(env) if args.note is None else args.note, "model_init_s": t_init,
         "meta": dict(env, command=bc.command_line("bench_hf_peer.py", argv)),
         "model": model_info(cfg, model, dtype),
         "budget": {k: v for k, v in budget.to_dict().items() if k not in ("static_slots", "kvrm_slots")},
         "engines": engines, "max_wall_s": args.max_wall,
         "workloads": {f: dict(bc.describe(work[f]), description=bc.DESCRIPTIONS[f]) for f in families},
         "results": results}
  if compare is not None:
    obj["compare"] = compare_excerpt(compare, args.compare_json, obj)
  return bc.publish(args, obj, render, print_summary)


def free_memory(hf: HF, device) -> None:
  gc.collect()
  if device.type == "cuda":
    hf.torch.cuda.empty_cache()


