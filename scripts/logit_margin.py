#!/usr/bin/env python3
"""Where two decode.py runs (e.g. --tp 1 and --tp 2 on GPUs) emitted different greedy tokens, how
close was the call? Replays run A's tokens through this machine's float32 engine (teacher forcing)
and prints, at each first divergence, the top logits and the margin between A's and B's tokens.

  python scripts/logit_margin.py A.json B.json [--checkpoint DIR] [--json OUT]

How to read a margin, relative to the logits' size (order 10):
- about 1e-6 of it: float32 rounding. Any two correct float32 programs whose reductions run in a
  different order (a psum over 2 devices against one device's matmul) may break such a tie
  differently.
- about 1e-3 of it: TF32 rounding. GPUs run float32 dots as TF32 unless told otherwise; our float32
  steps ask for IEEE float32.
- of order 0.1 or more: the two programs compute different things.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvrm_jax.cli import UserError, run_main  # noqa: E402


def divergences(a: list[list[int]], b: list[list[int]]) -> list[tuple[int, int]]:
  """(sequence index, first differing output position) for each sequence where a and b differ."""
  if len(a) != len(b):
    raise UserError(f"the runs hold {len(a)} and {len(b)} sequences: not the same prompts")
  out = []
  for i, (x, y) in enumerate(zip(a, b)):
    k = next((j for j in range(min(len(x), len(y))) if x[j] != y[j]), None)
    if k is not None:
      out.append((i, k))
  return out


def load_run(path: str) -> list[dict]:
  try:
    with open(path) as f:
      return json.load(f)["results"]
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot read decode.py output {path}: {e}") from None


def run(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("a", help="decode.py --output-json of run A (its tokens are replayed)")
  p.add_argument("b", help="decode.py --output-json of run B")
  p.add_argument("--checkpoint", help="orbax checkpoint folder (default: the bundled SmolLM2-135M)")
  p.add_argument("--top", type=int, default=3, help="logits shown per divergence")
  p.add_argument("--json", help="write the divergences and margins here")
  args = p.parse_args(argv)
  ra, rb = load_run(args.a), load_run(args.b)
  div = divergences([r["output_ids"] for r in ra], [r["output_ids"] for r in rb])
  print(f"{len(div)} of {len(ra)} sequences differ")
  if not div:
    return 0
  from kvrm_jax import checkpoint as ckpt
  from kvrm_jax.config import RuntimeConfig
  from kvrm_jax.engine import Engine
  from kvrm_jax.sequence import SamplingParams

  cfg, model, _ = ckpt.load_checkpoint(args.checkpoint or ckpt.ensure_bundled_checkpoint(), "float32")
  longest = max(len(ra[i]["prompt_ids"]) + len(ra[i]["output_ids"]) for i, _ in div)
  mb = -(-longest // 16) + 1
  rt = RuntimeConfig(block_size=16, num_blocks=len(div) * mb + 1, max_slots=len(div), max_blocks_per_seq=mb,
                     dtype="float32")
  eng = Engine(cfg, model, rt, with_logits=True)
  rids = {}
  for i, k in div:
    forced = ra[i]["output_ids"][:k + 1]
    rids[eng.add_request(ra[i]["prompt_ids"], SamplingParams(max_new_tokens=len(forced), ignore_eos=True),
                         forced_output=forced)] = (i, k)
  logits = {}
  while eng.has_work():
    eng.step()
    for rid, lg in (eng.last_logits or {}).items():
      i, k = rids[rid]
      if len(eng.requests[rid].output_ids) == k + 1:  # the logits that chose position k
        logits[rid] = np.asarray(lg, np.float32)
  rows = []
  for rid, (i, k) in rids.items():
    lg = logits[rid]
    ta, tb = ra[i]["output_ids"][k], rb[i]["output_ids"][k]
    top = np.argsort(-lg)[:args.top]
    row = {"sequence": i, "position": k, "token_a": ta, "token_b": tb, "logit_a": float(lg[ta]),
           "logit_b": float(lg[tb]), "margin_a_minus_b": float(lg[ta] - lg[tb]), "this_machine_argmax": int(top[0]),
           "top": [[int(t), float(lg[t])] for t in top]}
    rows.append(row)
    print(f"sequence {i}, output position {k}: A chose {ta} ({lg[ta]:.6f}), B chose {tb} ({lg[tb]:.6f}), "
          f"margin {lg[ta] - lg[tb]:+.2e}; this machine's argmax {top[0]}; top {args.top}: "
          + ", ".join(f"{t}:{lg[t]:.6f}" for t in top))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"a": args.a, "b": args.b, "divergences": rows}, f, indent=1)
  return 0


def main(argv=None) -> int:
  """Command-line entry: user errors end as one `error:` line and exit code 2."""
  return run_main(run, argv)


if __name__ == "__main__":
  sys.exit(main())
