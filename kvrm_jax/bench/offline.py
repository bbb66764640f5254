"""Offline decode throughput: KV-RM against the static-graph baseline, same requests, same KV budget.

  python scripts/bench_decode.py --model tiny --families uniform,mixed --num-requests 48 \\
      --out-json docs/raw/decode_cpu_tiny.json --report docs/results.md
  python scripts/bench_decode.py --model llama3-8b --dtype bfloat16 --kv-budget-gb 20 --max-len 4096 \\
      --families mixed --num-requests 256 --out-json out.json --report docs/results.md
  python scripts/bench_decode.py --from-json docs/raw/decode_cpu_tiny.json --report docs/results.md

All requests arrive at t=0; output lengths are forced (ignore_eos), so both engines generate the
same tokens. The static baseline reserves --max-len tokens per slot: slots = budget // blocks per
slot; KV-RM gets the same blocks and --slot-factor times the slots. Workload families (lengths
scale with --max-len = L):
  uniform        prompts and outputs uniform in [L/32, L/16]
  mixed          log-normal prompts (median L/16, sigma 1) and outputs (median L/32, sigma 0.8)
  longtail       1 in 16 requests has a very long history (prompt L/2..3L/4), the rest are short
  shared-prefix  7 in 8 requests start with one system prompt of L/4 tokens, then a short question
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kvrm_jax import bench as bc

KIND = "bench_decode"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  w = p.add_argument_group("workload")
  w.add_argument("--families", default=",".join(bc.FAMILIES), help=f"comma list of {', '.join(bc.FAMILIES)}")
  w.add_argument("--num-requests", type=int, default=48, help="requests per family")
  w.add_argument("--max-wall", type=float, default=None,
                 help="stop a run after this many seconds (its unfinished requests are counted as such)")
  bc.add_engine_args(p)
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- running


def run_offline(runner: bc.Runner, work, desc: str, quiet: bool, max_wall: float | None) -> dict:
  """Add every request at t=0, step until all are done; metrics of this run."""
  eng = runner.engine
  mark = runner.mark()
  rids, rejected = [], 0
  bar = bc.progress_bar(sum(n for _, n in work), desc, quiet)
  t0 = time.perf_counter()
  for prompt, n in work:
    rejected += not runner.add(prompt, n, t0, rids)
  idle = 0
  while eng.has_work():
    events = runner.step()
    if bar is not None:
      bar.update(sum(len(v) for v in events.values()))
    idle = 0 if events or runner.steps[-1][4] else idle + 1
    if idle > 1000 or (max_wall and time.perf_counter() - t0 > max_wall):
      break  # no progress (or out of time): the rest is reported as unfinished
  t_end = time.perf_counter()
  if bar is not None:
    bar.close()
  return runner.finish(rids, rejected, mark, t0, t_end)


def main(argv=None) -> int:
  return bc.report_main(argv, parse_args, KIND, render, print_summary, _run)


def _run(args, argv) -> int:
  bc.compile_cache.from_args(args)
  families = bc.family_args(args)
  kinds = bc.parse_engines(args.engines)
  env = bc.environment()
  su = bc.setup(args, "bench_decode")
  cfg, model, dtype, budget = su.cfg, su.model, su.dtype, su.budget
  bc.check_engines(kinds, budget, args, dtype)
  workloads = {f: bc.make_workload(f, args.num_requests, budget.max_len, cfg.vocab_size,
                                   np.random.default_rng([args.seed, i])) for i, f in enumerate(families)}
  results = {f: {} for f in families}
  engines = {}
  for kind in kinds:
    runner = bc.Runner(bc.build_engine(kind, cfg, model, budget, args, dtype), kind, budget.block_bytes)
    runner.warmup(budget.max_len, cfg.vocab_size, log=lambda line, kind=kind: print(f"[{kind}] {line}", flush=True))
    print(f"[{kind}] warm-up (compiles) {runner.warmup_s:.1f} s", flush=True)
    for fam in families:
      m = run_offline(runner, workloads[fam], f"{kind}/{fam}", args.quiet, args.max_wall)
      results[fam][kind] = m
      print(f"[{kind}/{fam}] {m['completed']}/{m['requests']} done, {m['tokens_per_s']:.1f} tok/s, "
            f"ITL p50 {bc.fmt(m['itl_ms']['p50'])} ms p99 {bc.fmt(m['itl_ms']['p99'])} ms, "
            f"step p50 {bc.fmt(m['step_ms']['p50'])} ms ({m['steps']} steps, {m['prefill_steps']} with prefill), "
            f"peak reserved/live KV {bc.fmt(m['kv']['peak_ratio'])}x, preemptions {m['preemptions']}", flush=True)
    engines[kind] = bc.engine_record(runner, [results[f][kind] for f in families])
    del runner
    bc.free_device_memory()

  workload_info = {f: dict(bc.describe(workloads[f]), description=bc.DESCRIPTIONS[f]) for f in families}
  if "prefill" in families:  # prompt throughput against this device's matmul rate, measured now
    workload_info["prefill"]["flops"] = bc.prompt_flops(cfg, [len(p) for p, _ in workloads["prefill"]])
    workload_info["prefill"]["matmul_tflops"] = bc.matmul_tflops(dtype)
  obj = {"kind": KIND, "label": args.label or bc.default_label("decode", env, args.model),
         "note": bc.default_note(env) if args.note is None else args.note,
         "model_init_s": su.init_s, "command": bc.command_line("bench_decode.py", argv), "env": env,
         "model": bc.model_info(cfg, model, dtype, su.source), "budget": budget.to_dict(), "engines": engines,
         "workloads": workload_info, "results": results}
  return bc.publish(args, obj, render, print_summary)


# ----------------------------------------------------------------------------- report


def title(obj: dict) -> str:
  env, note = obj["env"], obj.get("note")
  dev = "CPU" if env["backend"] == "cpu" else env["device"]
  return f"## Offline decode: {dev}, {obj['model']['name']} model" + (f", {note}" if note else "")


def render(obj: dict, md_path: str) -> None:
  """Write this run's section of the report (tables + PNGs) from its raw JSON."""
  obj = json.loads(json.dumps(obj))  # a live run renders exactly what --from-json will read back
  label, res = obj["label"], obj["results"]
  fams = list(res)
  kinds = list(next(iter(res.values())))
  body = [title(obj), "", bc.meta_lines(obj), "",
          f"Workloads (L = max_len = {obj['budget']['max_len']}; all requests arrive at t=0; outputs forced):", "",
          "| family | requests | prompt tokens mean / p50 / max | output tokens mean / p50 / max | shape |",
          "| --- | --- | --- | --- | --- |"]
  for f in fams:
    w = obj["workloads"][f]
    p, o = w["prompt_tokens"], w["output_tokens"]
    body.append(f"| {f} | {w['num_requests']} | {p['mean']:.0f} / {p['p50']:.0f} / {p['max']} | "
                f"{o['mean']:.0f} / {o['p50']:.0f} / {o['max']} | {w['description']} |")
  rows = []
  for f in fams:
    for k in kinds:
      rows.append(bc.engine_row(res[f][k], k, res[f].get("static") if k != "static" else None, prefix=[f]))
  body += ["", bc.table(rows, prefix=["family"])]
  if "mixed" in res and {"kvrm", "static"} <= set(res["mixed"]):
    k, s = res["mixed"]["kvrm"], res["mixed"]["static"]
    sp = k["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else 0.0
    r = k["kv"]["peak_ratio"] or float("inf")
    body.append(f"Targets (mixed family): KV-RM tokens/s {sp:.2f}x static (target >= {bc.TARGETS['mixed_speedup']}x: "
                f"{'met' if sp >= bc.TARGETS['mixed_speedup'] else 'not met'}); KV-RM peak reserved / live KV "
                f"{r:.2f}x (target <= {bc.TARGETS['reserved_over_live']}x: "
                f"{'met' if r <= bc.TARGETS['reserved_over_live'] else 'not met'}).\n")
  if "prefill" in res and "flops" in obj["workloads"]["prefill"]:
    w = obj["workloads"]["prefill"]
    body.append(f"Prefill only ({w['num_requests']} prompts x {w['prompt_tokens']['max']} tokens, one output token; "
                f"matmul rate measured in this run: {w['matmul_tflops']:.3g} TFLOP/s):\n")
    for k in kinds:
      m = res["prefill"][k]
      tf = w["flops"] / m["wall_s"] / 1e12
      body.append(f"- {k}: {m['prompt_tokens_per_s']:.0f} prompt tokens/s, {tf:.3g} TFLOP/s = "
                  f"{100 * tf / w['matmul_tflops']:.0f} % of the matmul rate")
    body.append("")
  if "mixed" in res and {"kvrm-mixed", "static"} <= set(res["mixed"]):
    m, s = res["mixed"]["kvrm-mixed"], res["mixed"]["static"]
    sp = m["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else 0.0
    body.append(f"Mixed steps (mixed family): {m['tokens_per_s']:.0f} output tokens/s, {sp:.2f}x static.\n")
  pads = [(f, k, res[f][k]["prompt_positions"]) for f in fams for k in kinds
          if (res[f][k].get("prompt_positions") or {}).get("positions")]
  if pads:
    body.append("Prompt positions the steps computed (bucket padding included): " + "; ".join(
        f"{f} / {k}: {p['tokens']:,} prompt tokens in {p['positions']:,} ({100 * p['padding']:.0f} % padding)"
        for f, k, p in pads) + ".\n")
  body.append(plots(obj, md_path))
  bc.update_report(md_path, label, "\n".join(body))


def plots(obj: dict, md_path: str) -> str:
  plt = bc.plt()
  label, res = obj["label"], obj["results"]
  fams = list(res)
  kinds = list(next(iter(res.values())))
  links = []

  path, link = bc.png_path(md_path, label, "throughput")
  fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(fams), 3.6))
  width = 0.8 / len(kinds)
  for i, k in enumerate(kinds):
    ys = [res[f][k]["tokens_per_s"] for f in fams]
    bars = ax.bar(np.arange(len(fams)) + (i - (len(kinds) - 1) / 2) * width, ys, width, label=k,
                  color=bc.COLORS.get(k))
    if k != "static" and "static" in kinds:
      for b, f in zip(bars, fams):
        base = res[f]["static"]["tokens_per_s"]
        if base:
          ax.annotate(f"{res[f][k]['tokens_per_s'] / base:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                      ha="center", va="bottom", fontsize=8)
  ax.set_xticks(np.arange(len(fams)), fams)
  ax.set_ylabel("output tokens/s")
  ax.set_title(f"throughput at equal KV budget ({obj['model']['name']})")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  bc.savefig(fig, path)
  links.append(f"![throughput per family]({link})")

  path, link = bc.png_path(md_path, label, "itl_cdf")
  fig, axs = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.2), squeeze=False)
  for ax, f in zip(axs[0], fams):
    bc.plot_itl_cdf(ax, res[f], f"ITL CDF: {f}")
  bc.savefig(fig, path)
  links.append(f"![inter-token latency CDF]({link})")

  path, link = bc.png_path(md_path, label, "kv")
  fig, axs = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.2), squeeze=False)
  for ax, f in zip(axs[0], fams):
    bc.plot_kv(ax, res[f], obj["budget"]["budget_bytes"], f"reserved vs live KV: {f}")
  bc.savefig(fig, path)
  links.append(f"![reserved vs live KV over time]({link})")
  return "\n\n".join(links) + "\n"


def print_summary(obj: dict) -> None:
  for f, per in obj["results"].items():
    for k, m in per.items():
      base = per.get("static")
      sp = f" ({m['tokens_per_s'] / base['tokens_per_s']:.2f}x static)" if base and k != "static" else ""
      print(f"{f:>13} {k:>6}: {m['tokens_per_s']:9.1f} tok/s{sp}, TTFT p50 {bc.fmt(m['ttft_ms']['p50'])} ms, "
            f"ITL p50/p99/max {'/'.join(bc.fmt(m['itl_ms'][q]) for q in ('p50', 'p99', 'max'))} ms, "
            f"KV reserved/live {bc.fmt(m['kv']['peak_ratio'])}x, spikes {m['spikes']['count']}, "
            f"done {m['completed']}/{m['requests']}")

