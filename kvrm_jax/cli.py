"""What the command-line scripts share: user errors end as one `error: ...` line, exit code 2; the
model and runtime flags of decode.py and serve.py, and the engine they build."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
  """Bad arguments or inputs (a user mistake, never a traceback)."""


def run_main(fn, argv) -> int:
  """Call fn(argv); UserError becomes one `error:` line and exit code 2."""
  try:
    return fn(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


def add_runtime_args(p: argparse.ArgumentParser, *, max_slots_help: str, num_blocks_help: str) -> None:
  """The model and runtime flags decode.py shares with serve.py."""
  p.add_argument("--checkpoint", help="orbax checkpoint folder (scripts/convert.py); default: the bundled "
                 "SmolLM2-135M-Instruct, converted once into the cache folder")
  p.add_argument("--cache-dir", help="where the bundled model is converted (default ~/.cache/kvrm-jax or $KVRM_JAX_CACHE)")
  p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: float32 on CPU, bfloat16 on GPU)")
  p.add_argument("--engine", default="kvrm", help="kvrm (paged KV-RM runtime) | static (dense baseline)")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--max-slots", type=int, default=None, help=max_slots_help)
  p.add_argument("--num-blocks", type=int, default=None, help=num_blocks_help)
  p.add_argument("--attention", default="auto", help="auto | reference | pallas | interpret")
  p.add_argument("--tp", default="1", help="tensor-parallel mesh size, or 'all' local devices; heads that do not "
                 "divide are padded with inert zero heads (docs/sharding.md)")
  p.add_argument("--summaries", help="bounded far-history summaries, e.g. sink=1,window=256,max=4 (off by "
                 "default; max=0 drops the far history, StreamingLLM-style)")


def load_model(args):
  """(cfg, model, tokenizer, mesh, dtype, checkpoint path) from the runtime flags; UserError for bad ones."""
  if args.engine not in ("kvrm", "static"):
    raise UserError(f"unknown --engine {args.engine!r} (kvrm | static)")
  if args.dtype not in (None, "bfloat16", "float32"):
    raise UserError(f"unknown --dtype {args.dtype!r} (bfloat16 | float32)")

  import jax

  from kvrm_jax import checkpoint as ckpt
  from kvrm_jax import sharding

  dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  try:
    path = args.checkpoint or ckpt.ensure_bundled_checkpoint(args.cache_dir)
    mesh = sharding.make_mesh(args.tp)
    cfg = ckpt.read_config(path)
    # Restore straight into the mesh's shardings unless the heads need padding first.
    shardings = None if sharding.padded_config(cfg, mesh.size) != cfg else sharding.named_shardings(mesh)
    cfg, model, tok = ckpt.load_checkpoint(path, dtype, shardings=shardings)
  except (ckpt.CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None
  if tok is None:
    raise UserError(f"checkpoint {path} has no tokenizer.json; text prompts need one")
  return cfg, model, tok, mesh, dtype, path


def make_engine(args, cfg, model, tok, mesh, dtype: str, *, max_slots: int, num_blocks: int, max_blocks_per_seq: int):
  """The Engine of the runtime flags (UserError for impossible sizes)."""
  from kvrm_jax.config import RuntimeConfig
  from kvrm_jax.engine import Engine
  from kvrm_jax.summaries import SummaryConfig
  try:
    summaries = SummaryConfig.parse(args.summaries) if args.summaries else None
    rt = RuntimeConfig(block_size=args.block_size, num_blocks=num_blocks, max_slots=max_slots,
                       max_blocks_per_seq=max_blocks_per_seq, dtype=dtype, attention=args.attention,
                       max_summaries=summaries.max_entries if summaries else 0)
    return Engine(cfg, model, rt, tokenizer=tok, kind=args.engine, mesh=mesh, summaries=summaries)
  except ValueError as e:
    raise UserError(str(e)) from None
