"""The HF transformers peer's report section (docs/results.md), with bench_decode's engines beside it."""

from __future__ import annotations

import json

from kvrm_jax import bench as bc


ENGINE = "hf"
COMPARED = ("kvrm", "kvrm-mixed", "static")  # bench_decode engines shown beside HF's with --compare-json


# ----------------------------------------------------------------------------- bench_decode beside HF

RUN_KEYS = ("requests", "completed", "rejected", "unfinished", "generated_tokens", "wall_s", "tokens_per_s", "ttft_ms",
            "queue_ms", "e2e_ms", "itl_ms", "itl_cdf_ms", "steps")


def read_compare(path: str) -> dict:
  return bc.read_json(path, "bench_decode")


def compare_excerpt(dec: dict, path: str, obj: dict) -> dict:
  """The bench_decode rows of our families, and whether they ran the same model, budget and requests."""
  fams = [f for f in obj["results"] if f in dec.get("results", {})]
  same_requests = {f: {k: v for k, v in dec["workloads"][f].items() if k != "description"} ==
                   {k: v for k, v in obj["workloads"][f].items() if k != "description"} for f in fams}
  return {"path": path, "label": dec.get("label"),
          "command": dec.get("command"), "date": dec["env"].get("date"), "device": dec["env"].get("device"),
          "model": dec["model"]["name"], "dtype": dec["model"]["dtype"], "budget_bytes": dec["budget"]["budget_bytes"],
          "same_model": (dec["model"]["name"], dec["model"]["dtype"]) == (obj["model"]["name"], obj["model"]["dtype"]),
          "same_budget": dec["budget"]["budget_bytes"] == obj["budget"]["budget_bytes"],
          "same_requests": same_requests,
          "results": {f: {k: {key: m.get(key) for key in RUN_KEYS} for k, m in dec["results"][f].items()
                          if k in COMPARED} for f in fams}}


# ----------------------------------------------------------------------------- report


def fmt_bytes(x) -> str:
  return "-" if x is None else bc.nbytes(x)


def title(obj: dict) -> str:
  env, note = obj["meta"], obj.get("note")
  dev = "CPU" if env["backend"] == "cpu" else env["device"]
  return f"## HF transformers peer (continuous batching): {dev}, {obj['model']['name']} model" + (
      f", {note}" if note else "")


def meta_lines(obj: dict) -> str:
  env, m, b = obj["meta"], obj["model"], obj["budget"]
  e = next(iter(obj["engines"].values()))
  cb = e["continuous_batching_config"]
  lines = [
      f"- device: {env['device']} ({env['backend']}, {env['device_count']} device(s)); date {env['date']}; "
      f"torch {env['torch']}, transformers {env['transformers']}, python {env['python']}",
      f"- model: {m['name']} ({m['source']}), {m['dtype']}, {m['params'] / 1e6:.1f} M params "
      f"({fmt_bytes(m['weights_bytes'])}), {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, head_dim "
      f"{m['head_dim']}, vocab {m['vocab']}",
      f"- KV budget: HF `num_blocks` {b['budget_blocks']} of {b['block_size']} tokens = {bc.nbytes(b['budget_bytes'])} "
      f"(bench_decode's per-engine budget); HF allocated {fmt_bytes(e['kv_cache_bytes'])} of cache tensors (its 2 "
      f"padding blocks included); max_len {b['max_len']} shapes the workload only (HF has no per-slot reservation)",
      f"- HF: attention `{e['attn_resolved']}` (asked `{e['attn_requested']}`), max_batch_tokens "
      f"{e['max_batch_tokens']}, max_requests_per_batch {cb.get('max_requests_per_batch')}, CUDA graphs "
      f"{cb.get('use_cuda_graph')}, async batching {cb.get('use_async_batching')}, prefix sharing "
      f"{cb.get('allow_block_sharing')}; greedy, EOS off, per-request max_new_tokens; warm-up "
      + ", ".join(f"{x['warmup_s']:.1f} s" for x in obj["engines"].values()) + " (untimed)",
      f"- command: `{env['command']}`",
      "- measured from HF's per-request records (`record_timestamps`): a host timestamp per token (so TTFT, ITL), "
      "admission (queue) and finish (e2e) times; forward passes = HF's batch counter. Not exposed by HF, so not "
      "reported: step times and spikes, reserved/live KV over time, decode batch, preemptions, host overhead",
  ]
  if env["backend"] == "cpu":
    lines.append("- CPU caveat: smoke numbers that check the pipeline, not performance claims")
  return "\n".join(lines) + "\n"


HEAD = ["family", "engine", "done / rejected / unfinished", "out tok/s", "vs HF", "TTFT p50 / p99 ms",
        "ITL p50 / p90 / p99 / max ms", "queue p50 / p99 ms", "e2e p50 / p99 ms", "forward passes / steps",
        "peak GPU memory"]


def row(fam: str, name: str, m: dict, base: dict) -> str:
  sp = f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base["tokens_per_s"] else "-"
  mem = (m.get("gpu_memory") or {}).get("peak_allocated_bytes")
  cells = [fam, name, f"{m['completed']}/{m['rejected']}/{m['unfinished']}", bc.fmt(m["tokens_per_s"]), sp,
           f"{bc.fmt(m['ttft_ms']['p50'])} / {bc.fmt(m['ttft_ms']['p99'])}",
           " / ".join(bc.fmt(m["itl_ms"][k]) for k in ("p50", "p90", "p99", "max")),
           f"{bc.fmt(m['queue_ms']['p50'])} / {bc.fmt(m['queue_ms']['p99'])}",
           f"{bc.fmt(m['e2e_ms']['p50'])} / {bc.fmt(m['e2e_ms']['p99'])}", bc.fmt(m["steps"]), fmt_bytes(mem)]
  return "| " + " | ".join(cells) + " |"


def render(obj: dict, md_path: str) -> None:
  """Write this run's section of the report (table + ITL CDF PNG) from its raw JSON."""
  obj = json.loads(json.dumps(obj))  # a live run renders exactly what --from-json will read back
  res, cmp = obj["results"], obj.get("compare")
  body = [title(obj), "", meta_lines(obj), "",
          f"Workloads (bench_decode's, L = max_len = {obj['budget']['max_len']}; all requests arrive at t=0; outputs "
          "forced):", "",
          "| family | requests | prompt tokens mean / p50 / max | output tokens mean / p50 / max | shape |",
          "| --- | --- | --- | --- | --- |"]
  for f, w in obj["workloads"].items():
    p, o = w["prompt_tokens"], w["output_tokens"]
    body.append(f"| {f} | {w['num_requests']} | {p['mean']:.0f} / {p['p50']:.0f} / {p['max']} | "
                f"{o['mean']:.0f} / {o['p50']:.0f} / {o['max']} | {w['description']} |")
  rows = []
  for f, per in res.items():
    hfm = per[ENGINE]
    rows.append(row(f, "HF transformers", hfm, hfm))
    for k, m in ((cmp or {}).get("results", {}).get(f) or {}).items():
      rows.append(row(f, f"{k} (bench_decode)", m, hfm))
  body += ["", "| " + " | ".join(HEAD) + " |", "|" + " --- |" * len(HEAD), *rows, ""]
  cut = [f for f, per in res.items() if per[ENGINE]["cut_by_max_wall"]]
  if cut:
    body.append(f"HF runs cut by --max-wall {obj['max_wall_s']:g} s: {', '.join(cut)} (tokens/s counts the tokens "
                "generated by the cut; the rest is unfinished).\n")
  if cmp:
    same = all(cmp["same_requests"].values()) and cmp["same_model"] and cmp["same_budget"]
    body.append(f"bench_decode rows from `{cmp['path']}` ({cmp['device']}, {cmp['date']}; `{cmp['command']}`): "
                + ("same model, KV budget and requests (token counts match)." if same else
                   f"NOT the same setup (model {cmp['model']} {cmp['dtype']}, budget {bc.nbytes(cmp['budget_bytes'])}, "
                   f"same requests {cmp['same_requests']}): the rows are not comparable.") + "\n")
  body.append(plot(obj, md_path))
  bc.update_report(md_path, obj["label"], "\n".join(body))


def plot(obj: dict, md_path: str) -> str:
  plt = bc.plt()
  res, cmp = obj["results"], obj.get("compare") or {}
  path, link = bc.png_path(md_path, obj["label"], "itl_cdf")
  fig, axs = plt.subplots(1, len(res), figsize=(3.6 * len(res), 3.2), squeeze=False)
  for ax, (f, per) in zip(axs[0], res.items()):
    runs = {"hf": per[ENGINE], **(cmp.get("results", {}).get(f) or {})}
    bc.plot_itl_cdf(ax, runs, f"ITL CDF: {f}")
  bc.savefig(fig, path)
  return f"![inter-token latency CDF]({link})\n"


def print_summary(obj: dict) -> None:
  for f, per in obj["results"].items():
    m = per[ENGINE]
    print(f"{f:>13} {ENGINE:>6}: {m['tokens_per_s']:9.1f} tok/s, TTFT p50 {bc.fmt(m['ttft_ms']['p50'])} ms, "
          f"ITL p50/p99/max {'/'.join(bc.fmt(m['itl_ms'][q]) for q in ('p50', 'p99', 'max'))} ms, "
          f"done {m['completed']}/{m['requests']}" + (" (cut by --max-wall)" if m["cut_by_max_wall"] else ""))
