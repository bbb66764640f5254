"""Models, the equal-KV-budget plan and the engines of a benchmark run.

The static baseline reserves `max_len` tokens per slot, so it gets `budget // max_blocks_per_seq`
slots; KV-RM gets the same blocks and `--slot-factor` times the slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvrm_jax import compile_cache
from kvrm_jax.cli import STEP_BUDGETS, UserError, parse_choices, parse_int_list, step_tokens
from kvrm_jax.config import SAMPLERS, ModelConfig, RuntimeConfig
from kvrm_jax.engine import Engine
from kvrm_jax.model import checkpoint as ckpt
from kvrm_jax.model.llama import Llama, random_model
from kvrm_jax.step import sharding
from kvrm_jax.step.attention import resolve_attention

MODELS = ("tiny", "smollm2-135m", "llama3-8b", "bundled")
ENGINES = ("kvrm", "kvrm-mixed", "static")  # kvrm-mixed: the KV-RM engine with mixed steps (--step-tokens)

# ----------------------------------------------------------------------------- arguments


def add_engine_args(p: argparse.ArgumentParser, *, max_len: int | None = None) -> None:
  """Model, KV budget and runtime flags shared by both scripts."""
  g = p.add_argument_group("model and KV budget")
  g.add_argument("--model", default="tiny", choices=MODELS,
                 help="preset shape with random weights, or `bundled` (the real SmolLM2-135M checkpoint)")
  g.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="default: bfloat16 on GPU, float32 on CPU")
  g.add_argument("--engines", default="kvrm,kvrm-mixed,static",
                 help="comma list of kvrm (separate prefill and decode calls), kvrm-mixed (one mixed step per "
                 "engine step), static (the static-graph baseline), run one after the other")
  add_budget_args(g, max_len=max_len, block_help="tokens per KV block",
                  max_len_help="per-sequence context limit (prompt + output); the static baseline reserves this "
                  "many tokens per slot",
                  blocks_help="KV pool size in blocks, the null block excluded")
  g.add_argument("--slot-factor", type=float, default=4.0,
                 help="KV-RM decode slots = this x the static baseline's slots (same blocks)")
  g.add_argument("--kvrm-slots", type=int, help="KV-RM decode slots (overrides --slot-factor)")
  g.add_argument("--prefill-buckets", default=None, help="comma list of prefill chunk sizes (default: the runtime's)")
  g.add_argument("--max-prefill-seqs", type=int, default=None, help="prompt chunks per prefill step")
  g.add_argument("--attention", default="auto", help="KV-RM attention backend: auto | reference | pallas | interpret")
  g.add_argument("--step-tokens", default="throughput", metavar="N|throughput|latency",
                 help="kvrm-mixed: tokens per engine step (decode tokens + prompt tiles): a number, or its slots + "
                 f"{STEP_BUDGETS['throughput']} (throughput, the default) or + {STEP_BUDGETS['latency']} (latency)")
  g.add_argument("--tile", type=int, default=64, help="kvrm-mixed: prompt tokens per query tile")
  g.add_argument("--tile-counts", default=None,
                 help="kvrm-mixed: comma list of a mixed step's tile counts below its largest (default: powers of two)")
  g.add_argument("--pipeline", action="store_true",
                 help="KV-RM engines: dispatch each decode step before reading the previous one's tokens")
  g.add_argument("--decode-buckets", default=None,
                 help="KV-RM engines: comma list of decode-step row counts below the slots (a step with no "
                 "prompt work runs the smallest that holds its requests, moved to the lowest slots; one compile "
                 "each); default: every decode step runs all slots")
  g.add_argument("--prompt-attention", default="auto",
                 help="KV-RM engines: how prompt chunks attend: gather | kernel (the paged tile kernel) | auto")
  g.add_argument("--matmul", default="xla", choices=["xla", "skinny"],
                 help="both engines' projection GEMMs: xla (XLA's dot, default) | skinny (the weight-streaming "
                 "Mosaic GPU kernel for steps of at most 256 rows, bf16 on Hopper)")
  g.add_argument("--greedy-only", action="store_true",
                 help="both engines' steps compiled for greedy decoding only (RuntimeConfig.greedy_only: no "
                 "branch between greedy and sampled rows; the benchmarks' requests are greedy)")
  g.add_argument("--sampler", default="auto", choices=list(SAMPLERS),
                 help="how both engines' steps sample (RuntimeConfig.sampler): auto (default: branch-free with "
                 "--pipeline on a GPU, else branch) | branch | branch-free (no branch in the steps, every sampling "
                 "route every step) | window (no branch, no search: at most the 64 most likely tokens kept)")
  g.add_argument("--tp", default=None, help="run both engines sharded (jax.shard_map) over a mesh of this many "
                 "devices, or 'all' local devices; the KV budget is the whole mesh's (default: no mesh)")
  compile_cache.add_args(g)
  add_output_args(p, seed_help=None, label_stem="<script>")


def add_output_args(p: argparse.ArgumentParser, *, seed_help: str | None, label_stem: str):
  """--seed, the raw JSON, the report and its section label; returns the group for more flags."""
  o = p.add_argument_group("output")
  o.add_argument("--seed", type=int, default=0, help=seed_help)
  o.add_argument("--out-json", help="write the raw results here")
  o.add_argument("--report", help="markdown report to create or update (its PNGs go next to it)")
  o.add_argument("--from-json", help="regenerate --report from this raw JSON without running anything")
  o.add_argument("--label",
                 help=f"section key in the report and PNG name stem (default: {label_stem}-<device>-<model>)")
  o.add_argument("--note", help="scale note shown in the section title (default on CPU: 'smoke scale')")
  o.add_argument("--quiet", action="store_true", help="no progress bar")
  return o


def add_budget_args(g, *, max_len: int | None, block_help: str, max_len_help: str, blocks_help: str) -> None:
  """--block-size, --max-len and the KV budget (--kv-budget-blocks or --kv-budget-gb)."""
  g.add_argument("--block-size", type=int, default=16, help=block_help)
  g.add_argument("--max-len", type=int, default=max_len, help=max_len_help + " (default: min(model context, 512) "
                 "for tiny/smollm2, 4096 for llama3-8b)")
  b = g.add_mutually_exclusive_group()
  b.add_argument("--kv-budget-blocks", type=int, help=blocks_help)
  b.add_argument("--kv-budget-gb", type=float, help="KV pool size in GB (1e9 bytes), K and V of all layers")


def parse_engines(text: str) -> list[str]:
  return parse_choices(text, ENGINES, "--engines")



def command_line(script: str, argv) -> str:
  return "python scripts/" + script + " " + shlex.join(list(sys.argv[1:] if argv is None else argv))


# ----------------------------------------------------------------------------- model and engines


@dataclasses.dataclass
class Setup:
  """What a benchmark run starts from: its model, dtype and equal-KV-budget plan."""

  cfg: ModelConfig
  model: Llama
  source: str  # where the weights come from
  dtype: str
  budget: "Budget"
  init_s: float  # model init (or checkpoint load) seconds


def setup(args, script: str) -> Setup:
  """Load the model of --model and plan the budget; prints one line about both."""
  dtype = args.dtype or default_dtype()
  t0 = time.perf_counter()
  cfg, model, source = load_model(args.model, dtype)
  init_s = time.perf_counter() - t0
  budget = plan_budget(cfg, args, dtype)
  print(f"[{script}] {jax.devices()[0].device_kind} | {args.model} {dtype} | budget {budget.budget_blocks} blocks "
        f"({budget.budget_bytes / 1e9:.3g} GB), max_len {budget.max_len} | slots: static {budget.static_slots}, "
        f"kvrm {budget.kvrm_slots}; model init {init_s:.1f} s", flush=True)
  return Setup(cfg, model, source, dtype, budget, init_s)


def default_dtype() -> str:
  return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def load_model(name: str, dtype: str):
  """(ModelConfig, Llama, source): random weights for presets, the real checkpoint for `bundled`."""
  if name == "bundled":
    try:
      cfg, model, _ = ckpt.load_checkpoint(ckpt.ensure_bundled_checkpoint(progress=False), dtype)
    except ckpt.CheckpointError as e:
      raise UserError(str(e)) from None
    return cfg, model, "bundled SmolLM2-135M-Instruct checkpoint"
  cfg = ModelConfig.from_name(name)
  return cfg, random_model(cfg, jnp.dtype(dtype)), "random weights"


def model_info(cfg, model, dtype: str, source: str) -> dict:
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
  return {"name": cfg.name, "source": source, "dtype": dtype, "params": n, "layers": cfg.num_layers,
          "hidden": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "vocab": cfg.vocab_size, "context": cfg.max_position}


def layer_flops_per_token(cfg) -> int:
  """FLOPs of the layers' matmuls (q, k, v, o, gate, up, down) for one token."""
  d, h, kh, e, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  return 2 * cfg.num_layers * (d * (h + 2 * kh) * e + h * e * d + 3 * d * i)


def attention_flops_per_key(cfg) -> int:
  """FLOPs of one query token against one key (QK^T and PV), all layers and heads."""
  return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim


def prompt_flops(cfg, lengths) -> float:
  """FLOPs of computing prompts of these lengths with one output token each: the layers' matmuls
  per token, causal attention per prompt (QK^T and PV over n(n+1)/2 pairs), the LM head once."""
  n = np.asarray(lengths, np.float64)
  attn = attention_flops_per_key(cfg) * (n * (n + 1) / 2)
  return float(layer_flops_per_token(cfg) * n.sum() + attn.sum() + 2 * cfg.hidden_size * cfg.vocab_size * len(n))


def matmul_tflops(dtype: str, iters: int = 10) -> float:
  """This device's measured dense matmul rate in `dtype` (median of `iters` n x n x n products, n =
  8192 on a GPU, 1024 elsewhere; float32 at the exact precision the engine uses), in TFLOP/s."""
  n = 8192 if jax.default_backend() == "gpu" else 1024
  prec = jax.lax.Precision.HIGHEST if dtype == "float32" else None
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=prec))
  a = jnp.ones((n, n), dtype)
  f(a, a).block_until_ready()
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    ts.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(ts)) / 1e12


def kv_block_bytes(cfg, block_size: int, dtype: str) -> int:
  """Bytes of one block of K and V over all layers."""
  itemsize = 2 if dtype == "bfloat16" else 4
  return 2 * cfg.num_layers * cfg.num_kv_heads * block_size * cfg.head_dim * itemsize


@dataclasses.dataclass
class Budget:
  """The equal-KV-memory plan of one run (both engines)."""

  block_size: int
  max_len: int  # tokens per sequence (prompt + output); the static baseline reserves it per slot
  max_blocks_per_seq: int
  budget_blocks: int  # usable blocks (the null block excluded), the same for both engines
  block_bytes: int
  static_slots: int
  kvrm_slots: int

  @property
  def budget_bytes(self) -> int:
    return self.budget_blocks * self.block_bytes

  def slots(self, kind: str) -> int:
    return self.static_slots if kind == "static" else self.kvrm_slots

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), budget_bytes=self.budget_bytes)


def plan_budget(cfg, args, dtype: str) -> Budget:
  bs = args.block_size
  if bs <= 0 or bs & (bs - 1):
    raise UserError(f"--block-size must be a positive power of two, got {bs}")
  max_len = args.max_len
  if max_len is None:
    max_len = 4096 if cfg.max_position >= 8192 and cfg.num_layers >= 32 else min(cfg.max_position, 512)
  if not 0 < max_len <= cfg.max_position:
    raise UserError(f"--max-len must be in [1, {cfg.max_position}] (the model context), got {max_len}")
  mb = math.ceil(max_len / bs)
  block_bytes = kv_block_bytes(cfg, bs, dtype)
  if args.kv_budget_blocks is not None:
    if args.kv_budget_blocks < 1:
      raise UserError(f"--kv-budget-blocks must be a positive number of blocks, got {args.kv_budget_blocks}")
    budget = args.kv_budget_blocks
  elif args.kv_budget_gb is not None:
    if not args.kv_budget_gb > 0:
      raise UserError(f"--kv-budget-gb must be a positive number of GB, got {args.kv_budget_gb:g}")
    budget = int(args.kv_budget_gb * 1e9 // block_bytes)
  else:
    budget = 8 * mb
  static_slots = budget // mb
  if static_slots < 1:
    raise UserError(f"a KV budget of {budget} blocks cannot hold one static slot of {mb} blocks "
                    f"({max_len} tokens); raise the budget or lower --max-len")
  kvrm_slots = args.kvrm_slots or max(1, int(round(args.slot_factor * static_slots)))
  if kvrm_slots < 1:
    raise UserError("--kvrm-slots must be positive")
  return Budget(bs, mb * bs, mb, budget, block_bytes, static_slots, kvrm_slots)


def runtime_for(kind: str, budget: Budget, args, dtype: str):
  """RuntimeConfig of one engine; Engine(kind='static') turns it into a dense 1 + S*MB pool."""
  kw = {}
  buckets = parse_int_list(args.prefill_buckets, "--prefill-buckets")
  if buckets:
    kw["prefill_buckets"] = buckets
  if args.max_prefill_seqs:
    kw["max_prefill_seqs"] = args.max_prefill_seqs
  slots = budget.slots(kind)
  if kind == "kvrm-mixed":
    kw.update(step_tokens=step_tokens(args.step_tokens, slots) or slots + STEP_BUDGETS["throughput"], tile=args.tile,
              tile_counts=parse_int_list(getattr(args, "tile_counts", None), "--tile-counts") or ())
  rows = parse_int_list(getattr(args, "decode_buckets", None), "--decode-buckets")
  if rows and kind != "static":
    kw["decode_buckets"] = rows
  num_blocks = 1 + slots * budget.max_blocks_per_seq if kind == "static" else budget.budget_blocks + 1
  try:
    return RuntimeConfig(block_size=budget.block_size, num_blocks=num_blocks, max_slots=slots,
                         max_blocks_per_seq=budget.max_blocks_per_seq, dtype=dtype,
                         attention="auto" if kind == "static" else args.attention,
                         prompt_attention="auto" if kind == "static" else getattr(args, "prompt_attention", "auto"),
                         pipeline=kind != "static" and getattr(args, "pipeline", False),
                         matmul=getattr(args, "matmul", "xla"), greedy_only=getattr(args, "greedy_only", False),
                         sampler=getattr(args, "sampler", "auto"), **kw)
  except ValueError as e:
    raise UserError(str(e)) from None


def check_engines(kinds, budget: Budget, args, dtype: str) -> None:
  """Every engine's RuntimeConfig from the flags, before the first engine is built: a flag only a
  later engine reads (--tile, --step-tokens, --decode-buckets ...) is one error line, not an error
  after the engines before it have compiled and run."""
  for kind in kinds:
    runtime_for(kind, budget, args, dtype)


def build_engine(kind: str, cfg, model, budget: Budget, args, dtype: str):
  tp, mesh = getattr(args, "tp", None), None
  try:
    mesh = None if tp is None else sharding.make_mesh(tp)
  except sharding.ShardingError as e:
    raise UserError(str(e)) from None
  rt = runtime_for(kind, budget, args, dtype)
  try:  # what the runtime cannot run here (e.g. --matmul skinny off a Hopper GPU): one error line
    return Engine(cfg, model, rt, kind="static" if kind == "static" else "kvrm", mesh=mesh)
  except ValueError as e:
    raise UserError(str(e)) from None


def attention_of(engine) -> str:
  return resolve_attention(engine.rt)


def engine_record(runner, runs: list[dict]) -> dict:
  """Per-engine facts: runtime, warm-up time, compile counts (in total and during the timed runs)."""
  eng = runner.engine
  during = {k: sum(m["compiles_during_run"][k] for m in runs) for k in ("decode", "prefill")}
  return {"runtime": dataclasses.asdict(eng.rt), "attention": attention_of(eng), "warmup_s": runner.warmup_s,
          "tp": None if eng.mesh is None else eng.mesh.size,
          "decode_compiles": eng.compiles.decode, "prefill_compiles": eng.compiles.prefill + eng.compiles.mixed,
          "compiles_during_runs": during}


def free_device_memory() -> None:
  """Collect dropped engines so their KV pools are gone before the next engine allocates its own."""
  gc.collect()
