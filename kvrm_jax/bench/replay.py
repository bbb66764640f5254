"""Replay a production trace (arrival times + token counts) through KV-RM and the static baseline.

  python scripts/replay_trace.py --trace traces/AzureLLMInferenceTrace_conv.csv \\
      --start 1850 --duration 20 --time-scale 4 --token-scale 0.25 --out-json docs/raw/replay.json \\
      --report docs/results.md
  python scripts/replay_trace.py --trace A.csv --start 1850 --trace B.jsonl --start 840 --duration 40 ...
  python scripts/replay_trace.py --from-json docs/raw/replay.json --report docs/results.md

A wall-clock serving loop: a request is `add_request`ed once its (scaled) arrival time has passed,
the engine steps whenever it has work and the loop sleeps until the next arrival otherwise. Each
engine replays the same window on its own clock, one engine after the other, at equal KV budget.

Traces: Azure LLM inference CSV (`TIMESTAMP, ContextTokens, GeneratedTokens`, timestamps like
`2023-11-16 18:15:46.6805900`) or JSONL with `timestamp` (milliseconds), `input_length` and
`output_length` per line (other fields ignored). Prompts are random token ids of the given length;
outputs are forced (ignore_eos). Token counts are scaled by --token-scale, then clipped to
--max-prompt / --max-output and to the context (--max-len); the report counts the clipped requests.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from kvrm_jax import bench as bc

KIND = "replay_trace"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  t = p.add_argument_group("trace")
  t.add_argument("--trace", action="append", default=[],
                 help="trace file (.csv or .jsonl), or a short name (conv, code) looked up in the folder "
                      "$KVRM_TRACES; repeatable")
  t.add_argument("--start", action="append", type=float, default=[],
                 help="window start, seconds from the trace's first request (once for all traces, or once per --trace)")
  t.add_argument("--duration", action="append", type=float, default=[],
                 help="window length in trace seconds (once, or once per --trace; default: to the end)")
  t.add_argument("--max-requests", type=int, default=None, help="at most this many requests of each window")
  t.add_argument("--time-scale", type=float, default=1.0, help="speed-up: replay seconds = trace seconds / this")
  t.add_argument("--token-scale", type=float, default=1.0, help="multiply prompt and output token counts")
  t.add_argument("--max-prompt", type=int, default=None, help="clip prompts (default: 3/4 of --max-len)")
  t.add_argument("--max-output", type=int, default=None, help="clip outputs (default: 1/4 of --max-len)")
  t.add_argument("--max-wall", type=float, default=None,
                 help="stop a replay after this many wall seconds; what is left counts as unfinished")
  bc.add_engine_args(p)
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- windows


def select(path: str, start: float, duration: float | None, args, max_len: int, vocab: int, seed: int) -> dict:
  """The replay of one window: requests (replay arrival s, prompt ids, output n) and what was done to them."""
  path = bc.resolve_trace(path)
  ts, ctx, gen = bc.load_trace(path)
  end = ts[-1] + 1e-9 if duration is None else start + duration
  idx = np.nonzero((ts >= start) & (ts < end))[0]
  if args.max_requests is not None:
    idx = idx[:args.max_requests]
  if not len(idx):
    raise bc.UserError(f"{path}: no requests in the window [{start}, {end}) s (the trace spans {ts[-1]:.0f} s)")
  max_prompt = args.max_prompt or 3 * max_len // 4
  max_output = args.max_output or max(1, max_len // 4)
  if max_prompt + 1 > max_len or max_output + 1 > max_len:
    raise bc.UserError(f"--max-prompt and --max-output must each leave room in --max-len {max_len}")
  rng = np.random.default_rng(seed)
  clipped = {"prompt": 0, "output": 0, "context": 0}
  reqs = []
  for i in idx:
    p = max(1, int(round(ctx[i] * args.token_scale)))
    o = max(1, int(round(gen[i] * args.token_scale)))
    if p > max_prompt:
      p, clipped["prompt"] = max_prompt, clipped["prompt"] + 1
    if o > max_output:
      o, clipped["output"] = max_output, clipped["output"] + 1
    if p + o > max_len:
      p, clipped["context"] = max_len - o, clipped["context"] + 1
    reqs.append(((ts[i] - start) / args.time_scale, rng.integers(3, vocab, p).tolist(), o))
  arr = np.array([r[0] for r in reqs])
  span = (end - start) / args.time_scale if duration is not None else float(arr[-1])
  # Arrivals per bin of one trace second (1 / time_scale replay seconds; at most 1 s), as a rate.
  bin_s = min(1.0, 1.0 / args.time_scale)
  counts = np.bincount((arr / bin_s).astype(int), minlength=max(1, int(np.ceil(span / bin_s))))
  rate = counts / bin_s
  mean = len(arr) / max(span, 1e-9)
  bursts = burst_bins(counts)
  p_tok = np.array([len(r[1]) for r in reqs])
  o_tok = np.array([r[2] for r in reqs])
  return {
      "name": bc.trace_name(path), "file": os.path.basename(path), "trace_requests": int(len(ts)),
      "trace_span_s": float(ts[-1]), "start": start, "duration": duration, "time_scale": args.time_scale,
      "token_scale": args.token_scale, "max_prompt": max_prompt, "max_output": max_output,
      "selected": len(reqs), "clipped": clipped,
      "raw_tokens": {"prompt_mean": float(ctx[idx].mean()), "output_mean": float(gen[idx].mean())},
      "tokens": {"prompt_mean": float(p_tok.mean()), "prompt_max": int(p_tok.max()), "prompt_total": int(p_tok.sum()),
                 "output_mean": float(o_tok.mean()), "output_max": int(o_tok.max()), "output_total": int(o_tok.sum())},
      "arrivals": {"replay_span_s": float(span), "mean_per_s": float(mean), "peak_per_s": float(rate.max()),
                   "bin_s": bin_s, "rate_per_s": [round(float(r), 3) for r in rate], "burst_bins": bursts},
      "_requests": reqs,
  }


# ----------------------------------------------------------------------------- serving loop


def replay(runner: bc.Runner, reqs, desc: str, quiet: bool, max_wall: float | None) -> dict:
  """Add each request when its arrival time has passed; step while there is work; idle otherwise."""
  eng = runner.engine
  mark = runner.mark()
  bar = bc.progress_bar(sum(r[2] for r in reqs), desc, quiet)
  rids, rejected, i, n = [], 0, 0, len(reqs)
  t0 = time.perf_counter()
  while True:
    now = time.perf_counter()
    if max_wall and now - t0 > max_wall:
      break
    while i < n and t0 + reqs[i][0] <= now:
      arrival, prompt, out = reqs[i]
      rejected += not runner.add(prompt, out, t0 + arrival, rids)
      i += 1
    if eng.has_work():
      events = runner.step()
      if bar is not None:
        bar.update(sum(len(v) for v in events.values()))
    elif i < n:
      time.sleep(max(0.0, t0 + reqs[i][0] - time.perf_counter()))
    else:
      break
  t_end = time.perf_counter()
  if bar is not None:
    bar.close()
  return runner.finish(rids, rejected, mark, t0, t_end, not_added=n - i, series_points=4000)


def burst_bins(counts) -> list[int]:
  """Bins (trace seconds) of a burst: >= 2 arrivals and more than the window's mean + 2 sd, or >= 2x its median."""
  c = np.asarray(counts, float)
  if not len(c):
    return []
  hi = np.minimum(c.mean() + 2 * c.std(), max(2 * np.median(c), 1.0))
  return [int(i) for i in np.nonzero((c >= 2) & (c > hi))[0]]


def check_window(args) -> None:
  """The replay's scales, trace window and clipping flags (replay_trace.py, bench_serve.py), before
  anything runs: a negative start or a length that is not positive is refused, and a zero clip is
  not "the default"."""
  if args.time_scale <= 0 or args.token_scale <= 0:
    raise bc.UserError("--time-scale and --token-scale must be positive")
  for v in args.start:
    if not v >= 0:
      raise bc.UserError(f"--start must be >= 0 seconds from the trace's first request, got {v:g}")
  for v in args.duration:
    if not v > 0:
      raise bc.UserError(f"--duration must be a positive number of trace seconds, got {v:g}")
  for flag in ("max_requests", "max_prompt", "max_output"):
    v = getattr(args, flag)
    if v is not None and v < 1:
      raise bc.UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")


def per_trace(values: list, n: int, flag: str, default):
  if not values:
    return [default] * n
  if len(values) == 1:
    return values * n
  if len(values) != n:
    raise bc.UserError(f"give {flag} once, or once per --trace ({n}), not {len(values)} times")
  return values


def main(argv=None) -> int:
  return bc.report_main(argv, parse_args, KIND, render, print_summary, _run)


def _run(args, argv) -> int:
  bc.compile_cache.from_args(args)
  if not args.trace:
    raise bc.UserError("give --trace FILE (or --from-json FILE to regenerate a report)")
  check_window(args)
  starts = per_trace(args.start, len(args.trace), "--start", 0.0)
  durations = per_trace(args.duration, len(args.trace), "--duration", None)
  kinds = bc.parse_engines(args.engines)
  env = bc.environment()
  su = bc.setup(args, "replay_trace")
  cfg, model, dtype, budget = su.cfg, su.model, su.dtype, su.budget
  bc.check_engines(kinds, budget, args, dtype)
  traces = [select(p, s, d, args, budget.max_len, cfg.vocab_size, args.seed + j)
            for j, (p, s, d) in enumerate(zip(args.trace, starts, durations))]
  names = [t["name"] for t in traces]
  for j, t in enumerate(traces):
    if names.count(t["name"]) > 1:
      t["name"] = f"{t['name']}{j}"
  for t in traces:
    a = t["arrivals"]
    print(f"[{t['name']}] {t['selected']} requests over {a['replay_span_s']:.1f} replay s (x{args.time_scale} speed), "
          f"{a['mean_per_s']:.1f}/s mean, {a['peak_per_s']:.0f}/s peak; clipped {t['clipped']}", flush=True)
  engines = {}
  for kind in kinds:
    runner = bc.Runner(bc.build_engine(kind, cfg, model, budget, args, dtype), kind, budget.block_bytes)
    runner.warmup(budget.max_len, cfg.vocab_size, log=lambda line, kind=kind: print(f"[{kind}] {line}", flush=True))
    print(f"[{kind}] warm-up (compiles) {runner.warmup_s:.1f} s", flush=True)
    runs = []
    for t in traces:
      m = replay(runner, t["_requests"], f"{kind}/{t['name']}", args.quiet, args.max_wall)
      t.setdefault("results", {})[kind] = m
      runs.append(m)
      print(f"[{kind}/{t['name']}] {m['completed']}/{m['requests']} done in {m['wall_s']:.1f} s, "
            f"{m['tokens_per_s']:.1f} tok/s, ITL p50 {bc.fmt(m['itl_ms']['p50'])} p99 {bc.fmt(m['itl_ms']['p99'])} ms, "
            f"step p50 {bc.fmt(m['step_ms']['p50'])} ms ({m['steps']} steps, {m['prefill_steps']} with prefill), "
            f"{m['spikes']['count']} spikes (max {bc.fmt(m['spikes']['max_over_median'])}x median)", flush=True)
    engines[kind] = bc.engine_record(runner, runs)
    del runner
    bc.free_device_memory()
  for t in traces:
    del t["_requests"]
  obj = {"kind": KIND, "label": args.label or bc.default_label("replay", env, args.model),
         "note": bc.default_note(env) if args.note is None else args.note,
         "model_init_s": su.init_s, "command": bc.command_line("replay_trace.py", argv), "env": env,
         "model": bc.model_info(cfg, model, dtype, su.source), "budget": budget.to_dict(), "engines": engines,
         "traces": traces}
  return bc.publish(args, obj, render, print_summary)


# ----------------------------------------------------------------------------- report


def render(obj: dict, md_path: str) -> None:
  """One report section per replayed trace (tables + PNGs), from the raw JSON."""
  obj = json.loads(json.dumps(obj))  # a live run renders exactly what --from-json will read back
  env, note = obj["env"], obj.get("note")
  dev = "CPU" if env["backend"] == "cpu" else env["device"]
  for t in obj["traces"]:
    label = f"{obj['label']}-{t['name']}"
    res = t["results"]
    a, c = t["arrivals"], t["clipped"]
    a["burst_bins"] = burst_bins(np.round(np.array(a["rate_per_s"]) * a["bin_s"]))
    end = "the end" if t["duration"] is None else f"{t['start'] + t['duration']:g} s"
    window = f"{t['start']:g} s to {end}"
    body = [f"## Trace replay ({t['name']}): {dev}, {obj['model']['name']} model" + (f", {note}" if note else ""), "",
            bc.meta_lines(obj),
            f"- trace: `{t['file']}` ({t['trace_requests']} requests over {t['trace_span_s']:.0f} s); window {window} "
            f"of the trace: {t['selected']} requests, replayed {t['time_scale']:g}x faster than real time "
            f"({a['replay_span_s']:.1f} s): {a['mean_per_s']:.3g} arrivals/s on average, "
            f"{a['peak_per_s']:.3g}/s at peak "
            f"(per trace second), {len(a['burst_bins'])} burst trace seconds (red in the plot: arrivals above the "
            f"window's mean + 2 sd or >= 2x its median)",
            f"- tokens: trace means prompt {t['raw_tokens']['prompt_mean']:.0f} / output "
            f"{t['raw_tokens']['output_mean']:.0f}; "
            f"scaled x{t['token_scale']:g}, clipped to prompt <= {t['max_prompt']}, output <= {t['max_output']}, "
            f"prompt + output <= max_len: {c['prompt']} prompts, {c['output']} outputs and {c['context']} contexts "
            f"clipped; replayed means prompt {t['tokens']['prompt_mean']:.0f} / output "
            f"{t['tokens']['output_mean']:.0f} "
            f"({t['tokens']['output_total']} output tokens in all)", ""]
    rows = []
    for k, m in res.items():
      extra = [f"{bc.fmt(m['queue_ms']['p50'])} / {bc.fmt(m['queue_ms']['p99'])}", bc.fmt(m["itl_p99_over_p50"]),
               f"{m['wall_s']:.1f}"]
      rows.append(bc.engine_row(m, k, res.get("static") if k != "static" else None, extra=extra))
    body.append(bc.table(rows, extra=["queueing delay p50 / p99 ms", "ITL p99 / p50", "wall s"]))
    checks = []
    for k, m in res.items():
      r, s = m["itl_p99_over_p50"], m["spikes"]["max_over_median"]
      ok_r = r is not None and r <= bc.TARGETS["itl_p99_over_p50"]
      ok_s = s is not None and s <= bc.TARGETS["spike"]
      checks.append(f"{k}: p99/p50 ITL {bc.fmt(r)} ({'met' if ok_r else 'not met'}), "
                    f"largest step {bc.fmt(s)}x median ({'met' if ok_s else 'not met'})")
    body.append(f"Targets (p99 ITL <= {bc.TARGETS['itl_p99_over_p50']}x p50, "
                f"no step > {bc.TARGETS['spike']:g}x median): "
                + "; ".join(checks) + ".\n")
    body.append(plots(obj, t, label, md_path))
    bc.update_report(md_path, label, "\n".join(body))


def plots(obj: dict, t: dict, label: str, md_path: str) -> str:
  plt = bc.plt()
  res, a = t["results"], t["arrivals"]
  kinds = list(res)
  path, link = bc.png_path(md_path, label, "steps")
  fig, axs = plt.subplots(len(kinds), 1, figsize=(10, 2.6 * len(kinds)), sharex=True, squeeze=False)
  for ax, k in zip(axs[:, 0], kinds):
    s = np.array(res[k]["series"]["steps"], float).reshape(-1, 4)
    rate = ax.twinx()
    w = a["bin_s"]
    bursts = burst_bins(np.round(np.array(a["rate_per_s"]) * w))
    rate.bar((np.arange(len(a["rate_per_s"])) + 0.5) * w, a["rate_per_s"], width=w, color="lightgray", alpha=0.6,
             zorder=0)
    for b in bursts:
      ax.axvspan(b * w, (b + 1) * w, color="red", alpha=0.12, lw=0)
    rate.set_ylabel("arrivals / s")
    ax.set_zorder(rate.get_zorder() + 1)
    ax.patch.set_visible(False)
    if len(s):
      pf = s[:, 3] > 0
      ax.scatter(s[~pf, 0], s[~pf, 1], s=4, color=bc.COLORS.get(k), label=f"{k}: decode step")
      ax.scatter(s[pf, 0], s[pf, 1], s=8, color="black", marker="x", label=f"{k}: step with prefill")
      med = res[k]["step_ms"]["p50"]
      ax.axhline(bc.SPIKE_FACTOR * med, color="red", ls="--", lw=0.8, label=f"{bc.SPIKE_FACTOR:g}x median")
    ax.set_yscale("log")
    ax.set_ylabel("step time (ms)")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_title(f"{k}: step time over the replay (gray bars: arrival rate per trace second; red: bursts)",
                 fontsize=9)
  axs[-1, 0].set_xlabel("replay time (s)")
  bc.savefig(fig, path)
  links = [f"![step time over the replay with arrival bursts]({link})"]

  path, link = bc.png_path(md_path, label, "itl_kv")
  fig, axs = plt.subplots(1, 2, figsize=(9, 3.4))
  bc.plot_itl_cdf(axs[0], res, f"ITL CDF ({t['name']})")
  bc.plot_kv(axs[1], res, obj["budget"]["budget_bytes"], f"reserved vs live KV ({t['name']})")
  bc.savefig(fig, path)
  links.append(f"![ITL CDF and reserved vs live KV]({link})")
  return "\n\n".join(links) + "\n"


def print_summary(obj: dict) -> None:
  for t in obj["traces"]:
    for k, m in t["results"].items():
      print(f"{t['name']:>8} {k:>6}: {m['tokens_per_s']:9.1f} tok/s, TTFT p50/p99 {bc.fmt(m['ttft_ms']['p50'])}/"
            f"{bc.fmt(m['ttft_ms']['p99'])} ms, queue p99 {bc.fmt(m['queue_ms']['p99'])} ms, ITL p50/p99/max "
            f"{bc.fmt(m['itl_ms']['p50'])}/{bc.fmt(m['itl_ms']['p99'])}/{bc.fmt(m['itl_ms']['max'])} ms, "
            f"spikes {m['spikes']['count']}, done {m['completed']}/{m['requests']} "
            f"(rejected {m['rejected']}, unfinished {m['unfinished']})")

