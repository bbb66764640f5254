"""What the command-line scripts share: user errors end as one `error: ...` line, exit code 2; the
model and runtime flags of decode.py and serve.py, and the engine they build."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import jax

from kvrm_jax.config import SAMPLER_WINDOW, SAMPLERS, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import checkpoint as ckpt
from kvrm_jax.sched.summaries import SummaryConfig
from kvrm_jax.step import gemm, sharding


class UserError(Exception):
  """Bad arguments or inputs (a user mistake, never a traceback)."""


def parse_choices(text: str, choices, flag: str) -> list[str]:
  """A comma list of distinct names out of `choices` (`--engines kvrm,static`); UserError otherwise."""
  names = [n.strip() for n in text.split(",") if n.strip()]
  bad = [n for n in names if n not in choices]
  if bad or not names or len(set(names)) != len(names):
    raise UserError(f"{flag} must be a comma list of {', '.join(choices)}, got {text!r}")
  return names


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


@contextlib.contextmanager
def phase(what: str):
  """Print `<what> ... 1.2 s` on stderr when the phase ends (a terminal or a log alike)."""
  t0 = time.perf_counter()
  yield
  print(f"{what} ... {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def check_writable(path: str) -> None:
  """Raise UserError now if `path` cannot be written, rather than after a long run."""
  existed = os.path.exists(path)
  try:
    with open(path, "a", encoding="utf-8"):
      pass
  except OSError as e:
    raise UserError(f"cannot write {path}: {e.strerror or e}") from None
  if not existed:
    os.remove(path)


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
  add_step_args(p)
  p.add_argument("--tp", default=None, help="tensor-parallel mesh size, or 'all' local devices; heads that do not "
                 "divide are padded with inert zero heads (docs/sharding.md). Default: no mesh, one device (the "
                 "benchmarks' engine; --tp 1 runs the sharded steps on a one-device mesh)")
  p.add_argument("--summaries", help="bounded far-history summaries, e.g. sink=1,window=256,max=4 (off by "
                 "default; max=0 drops the far history, StreamingLLM-style)")


def check_runtime_args(args) -> None:
  """The runtime flags that need no model: checked before anything slow starts."""
  if args.engine not in ("kvrm", "static"):
    raise UserError(f"unknown --engine {args.engine!r} (kvrm | static)")
  if args.dtype not in (None, "bfloat16", "float32"):
    raise UserError(f"unknown --dtype {args.dtype!r} (bfloat16 | float32)")
  # Sizes the runtime derives others from (divides by, falls back on) must be given positive.
  for flag in ("block_size", "max_slots", "num_blocks", "max_new_tokens"):
    v = getattr(args, flag, None)
    if v is not None and v < 1:
      raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")


def resolve_model(args):
  """(checkpoint path, cfg, tokenizer, mesh, dtype) from the runtime flags, weights not loaded yet;
  the bundled model is converted on its first use (a line per phase on stderr)."""
  check_runtime_args(args)


  dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
  try:
    mesh = None if args.tp is None else sharding.make_mesh(args.tp)
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
  return path, cfg, tok, mesh, dtype


def load_weights(path, cfg, mesh, dtype: str):
  """(cfg, model) of a resolved checkpoint, restored straight into the mesh's shardings unless the
  heads need padding first (a line with its time on stderr)."""
  try:
    with phase(f"loading checkpoint {path}"):
      shardings = (None if mesh is None or sharding.padded_config(cfg, mesh.size) != cfg
                   else sharding.named_shardings(mesh))
      cfg, model, _ = ckpt.load_checkpoint(path, dtype, shardings=shardings)
  except (ckpt.CheckpointError, ValueError) as e:
    raise UserError(str(e)) from None
  return cfg, model


def load_model(args):
  """(cfg, model, tokenizer, mesh, dtype, checkpoint path) from the runtime flags; UserError for bad ones."""
  path, cfg, tok, mesh, dtype = resolve_model(args)
  cfg, model = load_weights(path, cfg, mesh, dtype)
  return cfg, model, tok, mesh, dtype, path


def parse_int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
  """A comma list of positive integers (`--prefill-buckets 16,64`); None for None; UserError otherwise."""
  if text is None:
    return None
  try:
    vals = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise UserError(f"{flag} must be a comma list of integers, got {text!r}") from None
  if not vals or any(v <= 0 for v in vals):
    raise UserError(f"{flag} must list positive integers, got {text!r}")
  return vals


def add_step_args(p) -> None:
  """--step-tokens / --tile / --tile-counts / --prompt-attention / --pipeline / --decode-buckets / --matmul /
  --greedy-only / --sampler: the mixed step (RuntimeConfig.step_tokens, .tile, .tile_counts), how prompt chunks attend
  (.prompt_attention), the pipelined loop (.pipeline), the decode step's row counts (.decode_buckets),
  its GEMMs (.matmul), greedy-only steps (.greedy_only) and how steps sample (.sampler)."""
  p.add_argument("--step-tokens", default="0", metavar="N|throughput|latency",
                 help="one device call per engine step: decode tokens + prompt tiles, at most this many tokens "
                 f"(>= max slots + tile); throughput = max slots + {STEP_BUDGETS['throughput']} prompt tokens, "
                 f"latency = max slots + {STEP_BUDGETS['latency']} (shorter steps with prompt work, so smaller "
                 "inter-token gaps for the running requests); 0 (default): separate padded prefill and decode calls")
  p.add_argument("--tile", type=int, default=64, help="prompt tokens per query tile of a mixed step")
  p.add_argument("--tile-counts", default=None,
                 help="comma list of a mixed step's tile counts below its largest, one compile each (default: "
                 "powers of two); denser counts pad fewer prompt positions")
  p.add_argument("--pipeline", action="store_true",
                 help="dispatch each decode step before reading the previous step's tokens (the host's work "
                 "overlaps the device; same outputs)")
  p.add_argument("--decode-buckets", default=None,
                 help="comma list of decode-step row counts below the batch: a step with no prompt work runs the "
                 "smallest that holds its requests (moved to the lowest slots; same outputs), one compile each; "
                 "default: every decode step runs the whole batch")
  p.add_argument("--prompt-attention", default="auto",
                 help="how prompt chunks attend: gather (XLA gather + einsum) | kernel (the paged tile kernel: "
                 "Mosaic GPU on Hopper) | auto (gather)")
  p.add_argument("--greedy-only", action="store_true",
                 help="compile the steps for greedy decoding only (no branch between greedy and sampled rows "
                 "in the step, which makes the host wait for the device each step; docs/step.md) and refuse "
                 "requests with temperature > 0 (decode.py does this by itself at --temperature 0)")
  p.add_argument("--sampler", default="auto", choices=list(SAMPLERS),
                 help="how the steps sample (same tokens): branch (the sampling routes run only when a row needs "
                 "them, behind branches that make the host wait for the device) | branch-free (every route every "
                 "step, no branch: --pipeline can hide the host for sampled requests too) | auto (default: "
                 "branch-free with --pipeline on a GPU, else branch) | window (no branch and no search over the "
                 f"vocabulary: at most the {SAMPLER_WINDOW} most likely tokens are kept, top-p alone takes the "
                 f"nucleus of those, top-k > {SAMPLER_WINDOW} is refused; the cheapest sampler)")
  p.add_argument("--matmul", default="xla", choices=["xla", "skinny"],
                 help="projection GEMMs: xla (XLA's dot, default) | skinny (the weight-streaming Mosaic GPU kernel "
                 "for steps of at most 256 rows, bf16 on Hopper)")


# Named mixed-step budgets (--step-tokens): prompt tokens a step holds beside one decode token per slot.
# throughput: long prompt chunks per step (fewer, larger steps with prompt work; the budget of the
# benchmarks' mixed-step runs in docs/results.md); latency: a quarter of that, so a step with prompt work
# stays closer to a decode step's time.
STEP_BUDGETS = {"throughput": 2048, "latency": 512}


def step_tokens(text, max_slots: int, flag: str = "--step-tokens") -> int:
  """Tokens per mixed step of --step-tokens: an integer (0 = separate prefill and decode calls), or a
  named budget of STEP_BUDGETS (max_slots + its prompt tokens)."""
  text = str(text).strip()
  if text in STEP_BUDGETS:
    return max_slots + STEP_BUDGETS[text]
  try:
    return int(text)
  except ValueError:
    raise UserError(f"{flag} must be an integer or one of {', '.join(STEP_BUDGETS)}, got {text!r}") from None


def step_kwargs(args, max_slots: int) -> dict:
  """RuntimeConfig keywords of --step-tokens / --tile / --tile-counts / --prompt-attention / --pipeline /
  --decode-buckets / --matmul / --greedy-only / --sampler."""
  return {"step_tokens": step_tokens(args.step_tokens, max_slots), "tile": args.tile,
          "prompt_attention": args.prompt_attention,
          "tile_counts": parse_int_list(args.tile_counts, "--tile-counts") or (),
          "pipeline": args.pipeline, "decode_buckets": parse_int_list(args.decode_buckets, "--decode-buckets") or (),
          "matmul": args.matmul, "greedy_only": args.greedy_only, "sampler": args.sampler}


def runtime_config(args, dtype: str, *, max_slots: int, num_blocks: int, max_blocks_per_seq: int):
  """(RuntimeConfig, summaries) of the runtime flags; UserError for impossible sizes."""
  try:
    summaries = SummaryConfig.parse(args.summaries) if args.summaries else None
    rt = RuntimeConfig(block_size=args.block_size, num_blocks=num_blocks, max_slots=max_slots,
                       max_blocks_per_seq=max_blocks_per_seq, dtype=dtype, attention=args.attention,
                       max_summaries=summaries.max_entries if summaries else 0,
                       **step_kwargs(args, max_slots))
    gemm.check(rt)
  except ValueError as e:
    raise UserError(str(e)) from None
  return rt, summaries


def make_engine(args, cfg, model, tok, mesh, dtype: str, *, max_slots: int, num_blocks: int, max_blocks_per_seq: int):
  """The Engine of the runtime flags (UserError for impossible sizes)."""
  rt, summaries = runtime_config(args, dtype, max_slots=max_slots, num_blocks=num_blocks,
                                 max_blocks_per_seq=max_blocks_per_seq)
  try:
    return Engine(cfg, model, rt, tokenizer=tok, kind=args.engine, mesh=mesh, summaries=summaries)
  except ValueError as e:
    raise UserError(str(e)) from None
