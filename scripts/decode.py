#!/usr/bin/env python3
"""Decode prompts with kvrm-jax.

  python scripts/decode.py --prompt "The capital of France is"            # bundled SmolLM2-135M
  python scripts/decode.py --checkpoint ckpt/ --prompts-file prompts.jsonl --output-json out.json
  python scripts/decode.py --engine static ...                             # static-graph baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

from tqdm import tqdm

from kvrm_jax import compile_cache
from kvrm_jax.cli import (UserError, add_runtime_args, check_runtime_args, check_writable, load_weights,
                          resolve_model, run_main, runtime_config)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field (.jsonl/.json)")
  p.add_argument("--prompts-format", choices=("auto", "text", "jsonl"), default="auto",
                 help="format of --prompts-file; auto: JSONL for .jsonl/.json files, plain text otherwise")
  p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ignore-eos", action="store_true")
  add_runtime_args(p, max_slots_help="decode batch (default: min(#prompts, 16))",
                   num_blocks_help="KV pool blocks (default: fits every prompt at once)")
  p.add_argument("--output-json", help="write prompts, ids, texts and stats here")
  p.add_argument("--quiet", action="store_true", help="no per-prompt text on stdout")
  compile_cache.add_args(p)
  return p.parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    try:
      with open(args.prompts_file, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read prompts file {args.prompts_file}: {e}") from None
    fmt = args.prompts_format
    if fmt == "auto":
      fmt = "jsonl" if args.prompts_file.lower().endswith((".jsonl", ".json")) else "text"
    for i, ln in enumerate(lines, 1):
      if not ln.strip():
        continue
      if fmt == "jsonl":
        try:
          obj = json.loads(ln)
        except json.JSONDecodeError as e:
          raise UserError(f"{args.prompts_file}:{i}: invalid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
          raise UserError(f"{args.prompts_file}:{i}: JSONL lines need a string 'prompt' field")
        prompts.append(obj["prompt"])
      else:
        prompts.append(ln.replace("\\n", "\n"))
  if not prompts:
    raise UserError("no prompts: give --prompt TEXT or --prompts-file FILE")
  for i, pr in enumerate(prompts):
    if not pr.strip():
      raise UserError(f"prompt {i} is empty")
  return prompts


def main(argv=None) -> int:
  return run_main(lambda a: run(parse_args(a)), argv)


def run(args) -> int:
  check_runtime_args(args)
  prompts = read_prompts(args)
  if args.output_json:
    check_writable(args.output_json)
  compile_cache.from_args(args)
  from kvrm_jax.engine import Engine
  from kvrm_jax.sched.request import RequestError, SamplingParams

  # Everything a user can get wrong is checked before the slow phases (and their lines) start.
  try:
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
  except ValueError as e:
    raise UserError(str(e)) from None
  path, cfg, tok, mesh, dtype = resolve_model(args)
  if args.chat:
    try:
      prompts_text = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    except ValueError as e:
      raise UserError(str(e)) from None
  else:
    prompts_text = prompts
  ids = [tok.encode(p) for p in prompts_text]
  for i, x in enumerate(ids):
    if len(x) + args.max_new_tokens > cfg.max_position:
      raise UserError(f"prompt {i} has {len(x)} tokens; with --max-new-tokens {args.max_new_tokens} it exceeds "
                      f"the model context of {cfg.max_position}")
  if args.top_k > cfg.vocab_size:
    raise UserError(f"--top-k {args.top_k} exceeds the vocabulary of {cfg.vocab_size}")

  bs = args.block_size
  longest = max(len(x) for x in ids) + args.max_new_tokens
  mb = math.ceil(min(longest, cfg.max_position) / bs)
  need = sum(math.ceil((len(x) + args.max_new_tokens) / bs) for x in ids)
  rt, summaries = runtime_config(args, dtype, max_slots=args.max_slots or min(len(ids), 16),
                                 num_blocks=args.num_blocks or need + 1 + len(ids), max_blocks_per_seq=mb)
  if sp.temperature == 0:  # every request is greedy: steps without the greedy/sampled branch (same tokens)
    rt = dataclasses.replace(rt, greedy_only=True)
  cfg, model = load_weights(path, cfg, mesh, dtype)
  try:
    engine = Engine(cfg, model, rt, tokenizer=tok, kind=args.engine, mesh=mesh, summaries=summaries)
  except ValueError as e:
    raise UserError(str(e)) from None

  engine.on_compile = lambda name, s: tqdm.write(f"compiled the {name} in {s:.1f} s", file=sys.stderr)
  t0 = time.perf_counter()
  first = []

  def on_step(events):
    if events and not first:
      first.append(time.perf_counter() - t0)
      print(f"first token after {first[0]:.1f} s (compiling the steps included)", file=sys.stderr, flush=True)

  try:
    outs = engine.generate(ids, sp, progress=not args.quiet and sys.stderr.isatty(), on_step=on_step)
  except RequestError as e:
    raise UserError(str(e)) from None
  wall = time.perf_counter() - t0
  import jax
  stats = engine.summary()
  stats.update(tokens_per_s=stats["generated_tokens"] / wall, wall_s=wall, dtype=dtype,
               device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__)
  results = []
  for prompt, o in zip(prompts, outs):
    results.append({"prompt": prompt, "prompt_ids": o.prompt_ids, "output_ids": o.output_ids, "text": o.text,
                    "finish_reason": o.finish_reason})
    if not args.quiet:
      print(f"\n=== {prompt!r}\n{o.text}")
  print(f"\n[{stats['generated_tokens']} tokens in {wall:.2f}s = {stats['tokens_per_s']:.1f} tok/s; "
        f"engine={args.engine} dtype={dtype} device={stats['device']}; decode compiles "
        f"{stats['decode_compiles']}, prefill compiles {stats['prefill_compiles']}]")
  if args.output_json:
    try:
      with open(args.output_json, "w", encoding="utf-8") as f:
        json.dump({"results": results, "stats": stats}, f, indent=1)
    except OSError as e:
      raise UserError(f"cannot write {args.output_json}: {e}") from None
  failed = [i for i, o in enumerate(outs) if o.finish_reason == "error"]
  if failed:
    raise UserError(f"{len(failed)} of {len(outs)} prompts (first: prompt {failed[0]}) ended with an error: the model "
                    f"produced non-finite logits (NaN/inf); are the weights of {path} damaged?")
  return 0


if __name__ == "__main__":
  sys.exit(main())
