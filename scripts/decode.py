#!/usr/bin/env python3
"""Decode prompts with kvrm-jax.

  python scripts/decode.py --prompt "The capital of France is"            # bundled SmolLM2-135M
  python scripts/decode.py --checkpoint ckpt/ --prompts-file prompts.jsonl --output-json out.json
  python scripts/decode.py --engine static ...                             # static-graph baseline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvrm_jax import compile_cache  # noqa: E402
from kvrm_jax.cli import UserError, check_writable, phase, run_main  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", help="orbax checkpoint folder (scripts/convert.py); default: the bundled "
                 "SmolLM2-135M-Instruct, converted once into the cache folder")
  p.add_argument("--cache-dir", help="where the bundled model is converted (default ~/.cache/kvrm-jax or $KVRM_JAX_CACHE)")
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
  p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: float32 on CPU, bfloat16 on GPU)")
  p.add_argument("--engine", default="kvrm", help="kvrm (paged KV-RM runtime) | static (dense baseline)")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--max-slots", type=int, default=None, help="decode batch (default: min(#prompts, 16))")
  p.add_argument("--num-blocks", type=int, default=None, help="KV pool blocks (default: fits every prompt at once)")
  p.add_argument("--attention", default="auto", help="auto | reference | pallas | interpret")
  p.add_argument("--tp", default="1", help="tensor-parallel mesh size, or 'all' local devices; heads that do not "
                 "divide are padded with inert zero heads (docs/sharding.md)")
  p.add_argument("--summaries", help="bounded far-history summaries, e.g. sink=1,window=256,max=4 (off by "
                 "default; max=0 drops the far history, StreamingLLM-style)")
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


def check_sizes(args) -> None:
  """Sizes the runtime derives others from (divides by, falls back on) must be given positive."""
  for flag in ("block_size", "max_slots", "num_blocks", "max_new_tokens"):
    v = getattr(args, flag)
    if v is not None and v < 1:
      raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")


def run(args) -> int:
  if args.engine not in ("kvrm", "static"):
    raise UserError(f"unknown --engine {args.engine!r} (kvrm | static)")
  if args.dtype not in (None, "bfloat16", "float32"):
    raise UserError(f"unknown --dtype {args.dtype!r} (bfloat16 | float32)")
  check_sizes(args)
  prompts = read_prompts(args)
  if args.output_json:
    check_writable(args.output_json)

  import jax

  compile_cache.from_args(args)
  from kvrm_jax import checkpoint as ckpt
  from kvrm_jax import sharding
  from kvrm_jax.config import RuntimeConfig
  from kvrm_jax.engine import Engine, RequestError
  from kvrm_jax.sequence import SamplingParams
  from kvrm_jax.summaries import SummaryConfig

  dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  # Everything a user can get wrong is checked before the slow phases (and their lines) start.
  try:
    sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    summaries = SummaryConfig.parse(args.summaries) if args.summaries else None
    mesh = sharding.make_mesh(args.tp)
    path = args.checkpoint
    if path is None:
      path, ready = ckpt.bundled_checkpoint_dir(args.cache_dir)
      if not ready:
        print(f"converting the bundled SmolLM2-135M-Instruct into {path} (first run only)", file=sys.stderr)
        with phase("converted"):
          ckpt.ensure_bundled_checkpoint(args.cache_dir, progress=sys.stderr.isatty())
    cfg = ckpt.read_config(path)
    tok = ckpt.read_tokenizer(path)
  except (ckpt.CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None
  if tok is None:
    raise UserError(f"checkpoint {path} has no tokenizer.json; text prompts need one")
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
  slots = args.max_slots or min(len(ids), 16)
  need = sum(math.ceil((len(x) + args.max_new_tokens) / bs) for x in ids)
  try:
    rt = RuntimeConfig(block_size=bs, num_blocks=args.num_blocks or need + 1 + len(ids), max_slots=slots,
                       max_blocks_per_seq=mb, dtype=dtype, attention=args.attention,
                       max_summaries=summaries.max_entries if summaries else 0)
    with phase(f"loading checkpoint {path}"):
      # Restore straight into the mesh's shardings unless the heads need padding first.
      shardings = None if sharding.padded_config(cfg, mesh.size) != cfg else sharding.named_shardings(mesh)
      cfg, model, tok = ckpt.load_checkpoint(path, dtype, shardings=shardings)
    engine = Engine(cfg, model, rt, tokenizer=tok, kind=args.engine, mesh=mesh, summaries=summaries)
  except (ckpt.CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None

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
