#!/usr/bin/env python3
"""Serving benchmark over HTTP: the workloads of bench_decode.py and replay_trace.py sent to any
OpenAI-compatible server, measured as its clients see them.

  python scripts/serve.py --preset tiny --max-len 512 --max-queue 4096 &      # or any server
  python scripts/bench_serve.py --url http://127.0.0.1:8000 --families uniform,mixed --num-requests 48 \\
      --out-json out.json --report docs/results.md
  python scripts/bench_serve.py --url http://127.0.0.1:8000 --trace conv --start 1850 --duration 20
  python scripts/bench_serve.py --url ... --trace mooncake.jsonl --hash-block-size 512   # prefix sharing
  python scripts/bench_serve.py --from-json out.json --report docs/results.md

HTTP against in-process on a GPU, one call (the server gets the in-process engine's sizes and
runtime choices):

  python scripts/bench_decode.py --model llama3-8b --dtype bfloat16 --kv-budget-gb 20 --max-len 4096 \
      --engines kvrm-mixed --pipeline --greedy-only --prompt-attention kernel --decode-buckets 32,64 \
      --families mixed --num-requests 256 --quiet --out-json decode.json && \
  python scripts/bench_serve.py --launch "--preset llama3-8b --max-queue 4096" \
      --in-process-json decode.json --families mixed --num-requests 256 --max-len 4096 \
      --out-json serve.json --report docs/results.md

Only the client runs here (asyncio + httpx, one streaming `/v1/completions` request per workload
request). Prompts are token ids (random, from the same seeds as bench_decode.py / replay_trace.py,
so `--seed`, `--num-requests` and `--max-len` equal to theirs give the same requests) and outputs
are forced lengths (`ignore_eos`, greedy). Families send every request at t=0; traces send each at
its (scaled) arrival time. The server must queue them all: run kvrm-jax's with `--max-queue` at
least the number of requests (a 429 counts as an error).

JSONL traces whose lines carry `hash_ids` (one id per block of --hash-block-size tokens, as the
Mooncake traces do) get prompts built from those blocks: equal ids are equal token blocks, so the
server's prefix cache sees the sharing the trace records. The report shows the server's
prefix-cache hits, read from its `/metrics` before and after each run (kvrm-jax's
`kvrm_prefix_cache_hit_blocks_total`, or vLLM's `vllm:prefix_cache_hits_total` in tokens).

Client-side metrics: TTFT = first streamed chunk - request sent; ITL = gaps between a request's
consecutive chunks (kvrm-jax streams one chunk per token event); output tokens = the server's usage
counts; tokens/s = output tokens / wall time of the run. Against the in-process number of the same
workload: `--in-process-json` takes bench_decode.py's raw JSON and adds the ratio to the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np

# The workload code of the in-process benchmarks, imported here and nowhere else in this script.
from kvrm_jax import bench as bc
from kvrm_jax.bench import replay

KIND = "bench_serve"
PREFIX_METRICS = (("kvrm_prefix_cache_hit_blocks_total", "blocks"), ("vllm:prefix_cache_hits_total", "tokens"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  s = p.add_argument_group("server")
  s.add_argument("--url", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
  s.add_argument("--launch", metavar="ARGS", help="instead of --url: start scripts/serve.py with these flags on a "
                 "free loopback port, benchmark it, then stop it with SIGTERM; with --in-process-json, that run's KV-RM "
                 "engine is rebuilt: its sizes (--max-slots, --num-blocks, --block-size, --max-len), --dtype and "
                 "runtime choices (--step-tokens, --tile, --pipeline, --decode-buckets, --prompt-attention, "
                 "--attention, --matmul, --greedy-only, --sampler) are added unless ARGS has them")
  s.add_argument("--launch-timeout", type=float, default=1200.0, help="seconds the launched server may take to start")
  s.add_argument("--model", help="model name to send (default: the first of the server's /v1/models)")
  s.add_argument("--vocab-size", type=int, help="random prompt ids stay below it (default: the server's "
                 "/v1/models `vocab_size`, else 32000)")
  s.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
  w = p.add_argument_group("workload (bench_decode.py's families, or replay_trace.py's traces)")
  w.add_argument("--families", help=f"comma list of {', '.join(bc.FAMILIES)} (default: all, without --trace)")
  w.add_argument("--num-requests", type=int, default=48, help="requests per family")
  w.add_argument("--max-len", type=int, help="prompt + output tokens of a request (default: the server's "
                 "max_model_len, at most 512)")
  w.add_argument("--trace", action="append", default=[], help="trace file or short name, as replay_trace.py")
  w.add_argument("--start", action="append", type=float, default=[])
  w.add_argument("--duration", action="append", type=float, default=[])
  w.add_argument("--max-requests", type=int, default=None)
  w.add_argument("--time-scale", type=float, default=1.0)
  w.add_argument("--token-scale", type=float, default=1.0)
  w.add_argument("--max-prompt", type=int, default=None)
  w.add_argument("--max-output", type=int, default=None)
  w.add_argument("--hash-block-size", type=int, default=512,
                 help="tokens per `hash_ids` entry of JSONL traces (Mooncake: 512)")
  w.add_argument("--max-wall", type=float, default=None, help="cancel a run's requests after this many seconds")
  w.add_argument("--seed", type=int, default=0)
  o = p.add_argument_group("output")
  o.add_argument("--in-process-json", help="bench_decode.py raw JSON of the same workload: report HTTP / in-process")
  o.add_argument("--out-json", help="write the raw results here")
  o.add_argument("--report", help="markdown report to create or update (its PNGs go next to it)")
  o.add_argument("--from-json", help="regenerate --report from this raw JSON without running anything")
  o.add_argument("--label", help="section key in the report (default: serve-<model>)")
  o.add_argument("--note", help="note shown in the section title")
  o.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- workloads


def hash_prompts(path: str, start: float, duration: float | None, args, lengths: list[int], vocab: int,
                 seed: int) -> list[list[int]] | None:
  """Prompts of a JSONL trace window built from its `hash_ids` (None if the trace has none):
  block id h -> --hash-block-size token ids drawn from a generator seeded by (seed, h)."""
  if not path.endswith((".jsonl", ".json")):
    return None
  ts, hashes = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        o = json.loads(line)  # bc.load_trace has checked every line already
        ts.append(float(o["timestamp"]) / 1e3)
        hashes.append(o.get("hash_ids"))
  order = np.argsort(np.array(ts), kind="stable")  # the order of bc.load_trace
  ts = np.array(ts)[order] - np.array(ts)[order][0]
  end = ts[-1] + 1e-9 if duration is None else start + duration
  idx = np.nonzero((ts >= start) & (ts < end))[0][:args.max_requests]
  chosen = [hashes[order[i]] for i in idx]
  if all(h is None for h in chosen):
    return None
  bs, blocks, out = args.hash_block_size, {}, []
  rng = np.random.default_rng([seed, 1 << 20])
  for h, n in zip(chosen, lengths):
    ids: list[int] = []
    for x in h or []:
      if x not in blocks:
        blocks[x] = np.random.default_rng([seed, int(x)]).integers(3, vocab, bs).tolist()
      ids += blocks[x]
    if len(ids) < n:  # the trace's blocks cover fewer tokens than its length: unshared random tail
      ids += rng.integers(3, vocab, n - len(ids)).tolist()
    out.append(ids[:n])
  return out


def build_runs(args, max_len: int, vocab: int) -> list[dict]:
  """[{name, description, requests: [(arrival s, prompt ids, output tokens)], ...}] in run order."""
  runs = []
  if args.families or not args.trace:
    fams = bc.parse_families(args.families or ",".join(bc.FAMILIES))
    for i, f in enumerate(fams):
      work = bc.make_workload(f, args.num_requests, max_len, vocab, np.random.default_rng([args.seed, i]))
      runs.append({"name": f, "description": bc.DESCRIPTIONS[f], "workload": bc.describe(work),
                   "_requests": [(0.0, p, n) for p, n in work]})
  starts = replay.per_trace(args.start, len(args.trace), "--start", 0.0)
  durations = replay.per_trace(args.duration, len(args.trace), "--duration", None)
  for j, (path, st, du) in enumerate(zip(args.trace, starts, durations)):
    t = replay.select(path, st, du, args, max_len, vocab, args.seed + j)
    reqs = t.pop("_requests")
    shared = hash_prompts(bc.resolve_trace(path), st, du, args, [len(r[1]) for r in reqs], vocab,
                          args.seed + j)
    if shared is not None:
      reqs = [(a, p, n) for (a, _, n), p in zip(reqs, shared)]
    t.pop("arrivals", None)
    names = [r["name"] for r in runs]
    name = t["name"] if t["name"] not in names else f"{t['name']}{j}"
    runs.append({"name": name, "description": f"trace {t['file']} from {st} s" + (
        f", prompts from hash_ids blocks of {args.hash_block_size} tokens" if shared is not None else ""),
                 "trace": t, "_requests": reqs})
  return runs


# ----------------------------------------------------------------------------- the client


async def one_request(client, url: str, model: str, prompt: list[int], n: int, t0: float, arrival: float) -> dict:
  """Send one streaming completion at t0 + arrival; the arrival time of each chunk, the usage, errors."""
  await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
  body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}
  rec = {"sent": time.perf_counter(), "chunks": [], "tokens": 0, "error": None, "finish_reason": None}
  try:
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
      if r.status_code != 200:
        rec["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
        return rec
      buf = b""
      async for raw in r.aiter_raw():
        now = time.perf_counter()
        buf += raw
        *events, buf = buf.split(b"\n\n")
        for ev in events:
          if not ev.startswith(b"data: {"):
            continue
          if b'"usage":{' in ev:  # the usage chunk (no choices)
            rec["tokens"] = json.loads(ev[6:])["usage"]["completion_tokens"]
          else:
            rec["chunks"].append(now)
            m = re.search(rb'"finish_reason":"(\w+)"', ev)
            if m:
              rec["finish_reason"] = m.group(1).decode()
  except Exception as e:  # noqa: BLE001  (a failed request is counted, not fatal)
    rec["error"] = f"{type(e).__name__}: {e}"
  rec["done"] = time.perf_counter()
  return rec


async def run_requests(url: str, model: str, reqs, timeout: float, max_wall: float | None) -> tuple[list, float, float]:
  import httpx
  limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
  async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
    t0 = time.perf_counter() + 0.05
    tasks = [asyncio.ensure_future(one_request(client, url, model, p, n, t0, a)) for a, p, n in reqs]
    done, pending = await asyncio.wait(tasks, timeout=max_wall)
    for t in pending:
      t.cancel()
    recs = [t.result() if t in done else {"error": "cut by --max-wall", "chunks": [], "tokens": 0} for t in tasks]
    return recs, t0, time.perf_counter()


def scrape(url: str) -> dict:
  """The server's /metrics as {name: value} (unlabelled samples), {} if it has none."""
  import httpx
  try:
    text = httpx.get(url + "/metrics", timeout=30).text
  except httpx.HTTPError:
    return {}
  return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([^#\s{]+) (\S+)$", text, flags=re.M)}


def metrics(recs: list[dict], reqs, t0: float, t_end: float, before: dict, after: dict) -> dict:
  ok = [r for r in recs if r["error"] is None]
  errors = [r["error"] for r in recs if r["error"] is not None]
  ttft = [(r["chunks"][0] - r["sent"]) * 1e3 for r in ok if r["chunks"]]
  itl = np.concatenate([np.diff(r["chunks"]) for r in ok if len(r["chunks"]) > 1] or [np.zeros(0)]) * 1e3
  e2e = [(r["done"] - r["sent"]) * 1e3 for r in ok]
  gen = sum(r["tokens"] for r in recs)
  wall = max(t_end - t0, 1e-9)
  wrong = sum(1 for r, (_, _, n) in zip(ok, reqs) if r["tokens"] != n)
  hits = next(({"value": after[k] - before.get(k, 0.0), "unit": u} for k, u in PREFIX_METRICS if k in after), None)
  return {"requests": len(recs), "completed": len(ok), "errors": len(errors), "error_samples": errors[:5],
          "wrong_token_counts": wrong, "generated_tokens": gen, "wall_s": wall, "tokens_per_s": gen / wall,
          "ttft_ms": {**bc.pct(ttft, (50, 90, 99)), "mean": float(np.mean(ttft)) if ttft else None},
          "itl_ms": {**bc.pct(itl, (50, 90, 99, 100)), "mean": float(np.mean(itl)) if len(itl) else None},
          "e2e_ms": bc.pct(e2e, (50, 99)), "itl_cdf_ms": bc.cdf(itl), "prefix_cache_hits": hits,
          "preemptions": after.get("kvrm_preemptions_total", 0.0) - before.get("kvrm_preemptions_total", 0.0)
          if "kvrm_preemptions_total" in after else None,
          "server_prompt_tokens": after.get("kvrm_prompt_tokens_total", 0.0) - before.get("kvrm_prompt_tokens_total", 0.0)
          if "kvrm_prompt_tokens_total" in after else None,
          "server_step": server_steps(before, after)}


def server_steps(before: dict, after: dict) -> dict | None:
  """What kvrm-jax's server measured itself during a run, from its histograms: its engine steps (how
  many, mean time from dispatch to tokens, mean host time) and the mean TTFT and inter-token gap as
  the engine saw them (arrival in the server to the token leaving the engine), ms; None from
  a server without them. Against the client's own numbers they split a gap between the engine and
  the way to the client."""
  out = {}
  for key, name in (("step_ms", "kvrm_engine_step_seconds"), ("host_ms", "kvrm_engine_step_host_seconds"),
                    ("ttft_ms", "kvrm_time_to_first_token_seconds"), ("itl_ms", "kvrm_inter_token_latency_seconds")):
    if name + "_count" not in after:
      return None
    n = after[name + "_count"] - before.get(name + "_count", 0.0)
    if key == "step_ms":
      out["steps"] = n
    out[key] = 1e3 * (after[name + "_sum"] - before.get(name + "_sum", 0.0)) / n if n else None
  return out


def in_process_steps(ref: dict) -> dict:
  """The in-process run's engine steps per family, as the server's step histograms count them:
  {"step_ms": {family: mean ms}, "host_ms": {family: mean host ms}}."""
  kind, res = ref["_engine"], ref["results"]
  return {"step_ms": {f: r[kind].get("decode_device_ms", {}).get("mean") for f, r in res.items() if kind in r},
          "host_ms": {f: (r[kind].get("host_us", {}).get("mean") or 0) / 1e3 or None
                      for f, r in res.items() if kind in r}}


def server_info(url: str, args) -> tuple[str, int | None, int | None]:
  import httpx
  try:
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    cards = r.json()["data"]
  except (httpx.HTTPError, ValueError, KeyError) as e:
    raise bc.UserError(f"cannot list the models of {url}: {e}") from None
  if not cards and not args.model:
    raise bc.UserError(f"{url} serves no model; give --model")
  card = next((c for c in cards if c.get("id") == args.model), cards[0] if cards else {})
  return args.model or card["id"], card.get("max_model_len"), card.get("vocab_size")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
  return bc.run_main(_main, argv)


def _main(argv) -> int:
  args = parse_args(argv)
  if args.from_json:
    return bc.regenerate(args, KIND, render, print_summary)
  if bool(args.url) == bool(args.launch):
    raise bc.UserError("give --url of a running server or --launch ARGS (or --from-json FILE to regenerate a report)")
  ref = bc.read_json(args.in_process_json, "bench_decode") if args.in_process_json else None
  if ref is not None:
    ref["_engine"] = reference_engine(ref, args.in_process_json)
  bc.check_outputs(args.out_json, args.report)
  check_workload(args)
  if args.launch:
    start: dict = {}
    with launched(args.launch, ref, args.launch_timeout, start) as url:
      return bench(args, argv, url, ref, start)
  return bench(args, argv, args.url, ref)


def reference_engine(ref: dict, path: str) -> str:
  """The KV-RM engine of a bench_decode JSON that the server is compared with: its only one."""
  kinds = [k for k in ref["engines"] if k in ("kvrm", "kvrm-mixed")]
  if len(kinds) != 1:
    raise bc.UserError(f"{path} must hold one KV-RM engine (kvrm or kvrm-mixed) to compare with, it holds "
                       f"{kinds or 'none'}: run bench_decode.py with --engines kvrm or kvrm-mixed")
  return kinds[0]


def server_flags(ref: dict) -> dict:
  """serve.py flags that rebuild the in-process run's KV-RM engine: its sizes and runtime choices."""
  eng = ref["engines"][ref["_engine"]]
  b, rt = ref["budget"], eng["runtime"]
  flags = {"--max-slots": b["kvrm_slots"], "--num-blocks": b["budget_blocks"] + 1, "--block-size": b["block_size"],
           "--max-len": b["max_len"], "--dtype": rt["dtype"]}
  if rt.get("step_tokens"):
    flags.update({"--step-tokens": rt["step_tokens"], "--tile": rt["tile"]})
    if rt.get("tile_counts"):
      flags["--tile-counts"] = ",".join(map(str, rt["tile_counts"]))
  if rt.get("decode_buckets"):
    flags["--decode-buckets"] = ",".join(map(str, rt["decode_buckets"]))
  for key in ("prompt_attention", "attention"):
    if rt.get(key, "auto") != "auto":
      flags["--" + key.replace("_", "-")] = rt[key]
  if rt.get("matmul", "xla") != "xla":
    flags["--matmul"] = rt["matmul"]
  if rt.get("pipeline"):
    flags["--pipeline"] = None
  if rt.get("greedy_only"):
    flags["--greedy-only"] = None
  if rt.get("sampler", "auto") != "auto":
    flags["--sampler"] = rt["sampler"]
  if eng.get("tp"):  # a mesh (no mesh: the server's default too, so it compiles the same steps)
    flags["--tp"] = eng["tp"]
  return flags


@contextlib.contextmanager
def launched(flags: str, ref: dict | None, timeout: float, start: dict):
  """scripts/serve.py FLAGS on a free loopback port; yields its URL once healthy, SIGTERMs it after.
  start gets "t_launch" (perf_counter when the process was started) and "ready_s" (seconds to healthy)."""
  import httpx
  argv = shlex.split(flags)
  if ref is not None:
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    for k, v in server_flags(ref).items():
      if k not in given:
        argv += [k] if v is None else [k, str(v)]
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  argv = [sys.executable, os.path.join(bc.ROOT, "scripts", "serve.py"), *argv, "--host", "127.0.0.1", "--port", str(port)]
  print(f"[bench_serve] launching {shlex.join(argv[1:])}", flush=True)
  start["t_launch"] = time.perf_counter()
  proc = subprocess.Popen(argv)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + timeout
    while True:
      if proc.poll() is not None:
        raise bc.UserError(f"the launched server exited with status {proc.returncode}")
      if time.monotonic() > deadline:
        raise bc.UserError(f"the launched server was not healthy after {timeout:.0f} s")
      try:
        if httpx.get(url + "/health", timeout=5).status_code == 200:
          start["ready_s"] = time.perf_counter() - start["t_launch"]
          print(f"[bench_serve] the server was healthy {start['ready_s']:.1f} s after its launch", flush=True)
          break
      except httpx.HTTPError:
        pass
      time.sleep(0.1)
    yield url
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(120)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_workload(args) -> None:
  """The workload flags, before a server is launched or asked anything (a launch can take minutes)."""
  if args.num_requests < 1 or args.hash_block_size < 1:
    raise bc.UserError("--num-requests and --hash-block-size must be >= 1")
  if not args.timeout > 0:
    raise bc.UserError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
  bc.check_max_wall(args.max_wall)
  if args.families or not args.trace:
    bc.parse_families(args.families or ",".join(bc.FAMILIES))
  replay.check_window(args)
  replay.per_trace(args.start, len(args.trace), "--start", 0.0)
  replay.per_trace(args.duration, len(args.trace), "--duration", None)
  for path in args.trace:
    bc.resolve_trace(path)


def bench(args, argv, url: str, ref: dict | None, start: dict | None = None) -> int:
  """Every run of the workload against the server at url; reports. start: launched()'s timings
  (a launched server's start-up: healthy, and its first token streamed)."""
  url = url.rstrip("/")
  model, ctx, vocab = server_info(url, args)
  vocab = args.vocab_size or vocab or 32000
  max_len = args.max_len or min(ctx or 512, 512)
  if ctx is not None and max_len > ctx:
    raise bc.UserError(f"--max-len {max_len} exceeds the server's max_model_len {ctx}")
  runs = build_runs(args, max_len, vocab)
  print(f"[bench_serve] {url} model {model!r} (max_model_len {ctx}, vocab {vocab}); max_len {max_len}", flush=True)
  ref_steps = in_process_steps(ref) if ref is not None else {}
  for run in runs:
    reqs = run.pop("_requests")
    before = scrape(url)
    recs, t0, t_end = asyncio.run(run_requests(url, model, reqs, args.timeout, args.max_wall))
    firsts = [r["chunks"][0] for r in recs if r["chunks"]]
    if start and "first_token_s" not in start and firsts:
      start["first_token_s"] = min(firsts) - start["t_launch"]
    run["results"] = metrics(recs, reqs, t0, t_end, before, scrape(url))
    m = run["results"]
    st = m["server_step"] if m.get("server_step") and m["server_step"]["steps"] else None
    print(f"[{run['name']}] {m['completed']}/{m['requests']} done, {m['errors']} errors, {m['tokens_per_s']:.1f} tok/s, "
          f"TTFT p50 {bc.fmt(m['ttft_ms']['p50'])} ms, ITL p50/p99 {bc.fmt(m['itl_ms']['p50'])}/"
          f"{bc.fmt(m['itl_ms']['p99'])} ms, prefix-cache hits {m['prefix_cache_hits']}"
          + ("" if st is None else
             f", server-side TTFT / ITL mean {bc.fmt(st['ttft_ms'])} / {bc.fmt(st['itl_ms'])} ms (client: "
             f"{bc.fmt(m['ttft_ms']['mean'])} / {bc.fmt(m['itl_ms']['mean'])} ms)"),
          flush=True)
    if st is not None:
      name = run["name"]
      print(f"[{name}] engine steps through HTTP: mean {bc.fmt(st['step_ms'])} ms, host {bc.fmt(st['host_ms'])} ms"
            + (f"; in-process {bc.fmt(ref_steps['step_ms'][name])} ms, host {bc.fmt(ref_steps['host_ms'][name])} ms"
               if ref_steps.get("step_ms", {}).get(name) else ""), flush=True)
  label = args.label or "serve-" + re.sub(r"[^\w.-]+", "-", model)
  obj = {"kind": KIND, "label": label, "note": args.note or "",
         "command": bc.command_line("bench_serve.py", argv), "url": url, "model": model, "max_model_len": ctx,
         "vocab_size": vocab, "max_len": max_len,
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}
  if start:
    obj["launch"] = {k: start.get(k) for k in ("ready_s", "first_token_s")}
  if ref is not None:
    kind = ref["_engine"]
    obj["in_process"] = {"file": os.path.basename(args.in_process_json), "device": ref["env"]["device"],
                         "engine": kind,
                         "tokens_per_s": {f: r[kind]["tokens_per_s"] for f, r in ref["results"].items() if kind in r},
                         **ref_steps}
  if args.out_json:
    bc.write_json(args.out_json, obj)
  if args.report:
    render(obj, args.report)
  print_summary(obj)
  return 0


# ----------------------------------------------------------------------------- report


def _hits(m: dict) -> str:
  h = m.get("prefix_cache_hits")
  return "-" if h is None else f"{h['value']:.0f} {h['unit']}"


def render(obj: dict, md_path: str) -> None:
  """This run's section of the report (table + PNGs) from its raw JSON."""
  obj = json.loads(json.dumps(obj))
  ref = (obj.get("in_process") or {}).get("tokens_per_s", {})
  body = [f"## Serving over HTTP: {obj['model']}" + (f", {obj['note']}" if obj.get("note") else ""), "",
          f"- server {obj['url']}, model `{obj['model']}` (max_model_len {obj['max_model_len']}); "
          f"max_len {obj['max_len']}; date {obj['date']}",
          f"- command: `{obj['command']}`"]
  if obj.get("launch"):
    la = obj["launch"]
    body.append(f"- start-up of the launched server: healthy {bc.fmt(la['ready_s'])} s after its launch, its first "
                f"token streamed {bc.fmt(la['first_token_s'])} s after the launch")
  if obj.get("in_process"):
    body.append(f"- in-process reference: `{obj['in_process']['file']}` ({obj['in_process']['device']}, engine "
                f"{obj['in_process'].get('engine', 'kvrm')})")
  body += ["", "| run | done / errors | out tok/s | vs in-process | TTFT p50 / p90 / p99 ms | "
           "ITL p50 / p90 / p99 / max ms | e2e p50 / p99 ms | prefix-cache hits | preemptions |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for run in obj["runs"]:
    m = run["results"]
    vs = f"{m['tokens_per_s'] / ref[run['name']]:.2f}x" if ref.get(run["name"]) else "-"
    body.append(f"| {run['name']} | {m['completed']}/{m['errors']} | {bc.fmt(m['tokens_per_s'])} | {vs} | "
                + " / ".join(bc.fmt(m["ttft_ms"][k]) for k in ("p50", "p90", "p99")) + " | "
                + " / ".join(bc.fmt(m["itl_ms"][k]) for k in ("p50", "p90", "p99", "max")) + " | "
                + " / ".join(bc.fmt(m["e2e_ms"][k]) for k in ("p50", "p99"))
                + f" | {_hits(m)} | {bc.fmt(m['preemptions'])} |")
  body.append("")
  body += [f"- {run['name']}: {run['description']}" for run in obj["runs"]]
  body += ["", plots(obj, md_path)]
  bc.update_report(md_path, obj["label"], "\n".join(body))


def plots(obj: dict, md_path: str) -> str:
  plt = bc.plt()
  runs = obj["runs"]
  path, link = bc.png_path(md_path, obj["label"], "serve")
  fig, axs = plt.subplots(1, 2, figsize=(9, 3.4))
  axs[0].bar([r["name"] for r in runs], [r["results"]["tokens_per_s"] for r in runs], color="tab:blue")
  axs[0].set_ylabel("output tokens/s (client side)")
  axs[0].set_title("throughput over HTTP")
  axs[0].grid(axis="y", alpha=0.3)
  bc.plot_itl_cdf(axs[1], {r["name"]: r["results"] for r in runs}, "ITL CDF (client side)")
  bc.savefig(fig, path)
  return f"![serving throughput and ITL]({link})\n"


def print_summary(obj: dict) -> None:
  ref = (obj.get("in_process") or {}).get("tokens_per_s", {})
  for run in obj["runs"]:
    m = run["results"]
    vs = f" ({m['tokens_per_s'] / ref[run['name']]:.2f}x in-process)" if ref.get(run["name"]) else ""
    print(f"{run['name']:>13}: {m['tokens_per_s']:9.1f} tok/s{vs}, TTFT p50/p99 {bc.fmt(m['ttft_ms']['p50'])}/"
          f"{bc.fmt(m['ttft_ms']['p99'])} ms, ITL p50/p90/p99 "
          f"{'/'.join(bc.fmt(m['itl_ms'][q]) for q in ('p50', 'p90', 'p99'))} ms, done {m['completed']}/"
          f"{m['requests']}, errors {m['errors']}, prefix-cache hits {_hits(m)}")
  if obj.get("launch"):
    la = obj["launch"]
    print(f"     start-up: healthy {bc.fmt(la['ready_s'])} s after the launch, first token {bc.fmt(la['first_token_s'])} s")


if __name__ == "__main__":
  sys.exit(main())
