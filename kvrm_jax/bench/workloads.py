"""Benchmark workloads: synthetic request families and production-trace windows.

Families (`make_workload`): uniform short; mixed-length (log-normal prompt and output lengths);
long-tail (a few very long histories among short ones); shared-prefix (a chat system prompt);
prefill (long prompts, one output token: prompt throughput).
Traces (`load_trace`): Azure LLM inference CSV (`TIMESTAMP, ContextTokens, GeneratedTokens`,
timestamps like `2023-11-16 18:15:46.6805900`) or JSONL with `timestamp` (milliseconds),
`input_length` and `output_length` per line (other fields ignored).
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import re

import numpy as np

from kvrm_jax.cli import UserError, parse_choices

FAMILIES = ("uniform", "mixed", "longtail", "shared-prefix", "prefill")
DESCRIPTIONS = {
    "uniform": "short prompts and outputs, uniform in [L/32, L/16]",
    "mixed": "log-normal prompts (median L/16, sigma 1) and outputs (median L/32, sigma 0.8)",
    "longtail": "1 in 16 requests has a long history (prompt L/2..3L/4, output L/16..L/8); the rest L/64..L/16",
    "shared-prefix": "7 in 8 requests share one L/4-token system prompt, then L/64..L/16 tokens; outputs L/32..L/16",
    "prefill": "prefill only: prompts of min(L/2, 2048) tokens, one output token each",
}
TRACES_ENV = "KVRM_TRACES"  # folder of trace files, for short names such as `conv`


def make_workload(family: str, n: int, max_len: int, vocab: int, rng: np.random.Generator) -> list[tuple[list, int]]:
  """n requests (prompt token ids, forced output length) of one family; prompt + output <= max_len."""
  L = max_len
  ids = lambda k: rng.integers(3, vocab, int(k)).tolist()  # noqa: E731
  uni = lambda lo, hi: int(rng.integers(max(1, int(lo)), max(2, int(hi)) + 1))  # noqa: E731
  out = []
  if family == "uniform":
    for _ in range(n):
      out.append((uni(L / 32, L / 16), uni(L / 32, L / 16)))
  elif family == "mixed":
    p = np.clip(rng.lognormal(np.log(L / 16), 1.0, n), 4, 3 * L // 4).astype(int)
    o = np.clip(rng.lognormal(np.log(L / 32), 0.8, n), 4, L // 4).astype(int)
    out = list(zip(p.tolist(), o.tolist()))
  elif family == "longtail":
    n_long = max(1, n // 16)
    long = set(rng.choice(n, n_long, replace=False).tolist())
    for i in range(n):
      if i in long:
        out.append((uni(L / 2, 3 * L / 4), uni(L / 16, L / 8)))
      else:
        out.append((uni(L / 64, L / 16), uni(L / 64, L / 16)))
  elif family == "shared-prefix":
    system = ids(L // 4)
    work = []
    for i in range(n):
      q, o = uni(L / 64, L / 16), uni(L / 32, L / 16)
      work.append((system + ids(q) if i % 8 else ids(L // 4 + q), o))
    return [(p[:max_len - o], o) for p, o in work]
  elif family == "prefill":
    out = [(min(L // 2, 2048), 1)] * n
  else:
    raise UserError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
  return [(ids(min(p, max_len - o)), o) for p, o in out]


def describe(work) -> dict:
  """Prompt and output length statistics of a workload."""
  p = np.array([len(x) for x, _ in work])
  o = np.array([n for _, n in work])
  def st(a):
    return {"mean": float(a.mean()), "p50": float(np.median(a)), "max": int(a.max()), "total": int(a.sum())}
  return {"num_requests": len(work), "prompt_tokens": st(p), "output_tokens": st(o)}


def parse_families(text: str) -> list[str]:
  """--families: a comma list of distinct FAMILIES names (UserError otherwise)."""
  return parse_choices(text, FAMILIES, "--families")


def family_args(args) -> list[str]:
  """The workload flags of the family benchmarks: --families, checked, and --num-requests >= 1."""
  if args.num_requests < 1:
    raise UserError("--num-requests must be >= 1")
  return parse_families(args.families)


def check_max_wall(seconds: float | None) -> None:
  """--max-wall: None (no limit) or a positive number of seconds (0 or less would cut every run at
  once and report it as a measurement)."""
  if seconds is not None and not seconds > 0:
    raise UserError(f"--max-wall must be a positive number of seconds, got {seconds:g}")


def resolve_trace(path: str) -> str:
  """A trace file path, or a short name looked up in $KVRM_TRACES: `conv` ->
  $KVRM_TRACES/AzureLLMInferenceTrace_conv.csv. A path with a folder in it must be a file."""
  if os.path.isfile(path):
    return path
  if os.sep in path or (os.altsep and os.altsep in path):
    raise UserError(f"no trace file {path!r}")
  folder = os.environ.get(TRACES_ENV)
  for name in (path, f"AzureLLMInferenceTrace_{path}.csv"):
    if folder and os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  where = f"${TRACES_ENV}={folder}" if folder else f"${TRACES_ENV} (unset)"
  raise UserError(f"no trace {path!r}: not a file, nor a trace name in {where}")


def parse_timestamp(text: str) -> float:
  """`2023-11-16 18:15:46.6805900` (any number of fractional digits) -> POSIX seconds (UTC)."""
  text = text.strip()
  main, _, frac = text.partition(".")
  dt = datetime.datetime.strptime(main.replace("T", " "), "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
  return dt.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


def load_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(arrival seconds from the first request, prompt tokens, output tokens), sorted by arrival."""
  ts, ctx, gen = [], [], []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      if path.endswith((".jsonl", ".json")):
        for i, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            o = json.loads(line)
            ts.append(float(o["timestamp"]) / 1e3)
            ctx.append(int(o["input_length"]))
            gen.append(int(o["output_length"]))
          except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{i}: need JSON with timestamp (ms), input_length, output_length: {e}") from None
      else:
        rows = csv.reader(f)
        head = [h.strip().lower() for h in next(rows, [])]
        try:
          it, ic, ig = head.index("timestamp"), head.index("contexttokens"), head.index("generatedtokens")
        except ValueError:
          raise UserError(f"{path}: need CSV columns TIMESTAMP, ContextTokens, GeneratedTokens, "
                             f"got {head}") from None
        for i, r in enumerate(rows, 2):
          if not r:
            continue
          try:
            ts.append(parse_timestamp(r[it]))
            ctx.append(int(r[ic]))
            gen.append(int(r[ig]))
          except (ValueError, IndexError) as e:
            raise UserError(f"{path}:{i}: bad row {r}: {e}") from None
  except OSError as e:
    raise UserError(f"cannot read trace {path}: {e}") from None
  if not ts:
    raise UserError(f"trace {path} has no requests")
  ts, ctx, gen = np.array(ts), np.array(ctx), np.array(gen)
  order = np.argsort(ts, kind="stable")
  return ts[order] - ts[order][0], ctx[order], gen[order]


def trace_name(path: str) -> str:
  stem = os.path.splitext(os.path.basename(path))[0]
  return re.sub(r"\W+", "-", re.sub(r"(?i)^azurellminferencetrace_?", "", stem)).strip("-").lower() or "trace"

