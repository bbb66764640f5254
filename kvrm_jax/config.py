"""Frozen, self-validating configurations: the model's shape and the runtime's static sizes.

Everything here is static (hashable) and decides compiled shapes; anything that changes per step
is an array in the descriptor instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA)."""

  name: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Llama-3 style rope scaling as a sorted tuple of (key, value) pairs (hashable), or ().
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position: int = 2048
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_position"):
      if getattr(self, f) <= 0:
        raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling)

  def to_json(self) -> str:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dict(self.rope_scaling)
    d["eos_ids"] = list(self.eos_ids)
    return json.dumps(d, indent=1)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    d["rope_scaling"] = tuple(sorted((d.get("rope_scaling") or {}).items()))
    d["eos_ids"] = tuple(d.get("eos_ids") or ())
    return cls(**d)

  @classmethod
  def from_name(cls, name: str) -> "ModelConfig":
    if name not in PRESETS:
      raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_embeddings=True, max_position=8192, bos_id=1, eos_ids=(2,)),
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}.items())),
        rms_norm_eps=1e-5, tie_embeddings=False, max_position=8192, bos_id=128000,
        eos_ids=(128001, 128009)),
    # Small enough for fast CPU tests; heads divide by 2 for tensor-parallel tests.
    "tiny": ModelConfig(
        name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_embeddings=False, max_position=1024, bos_id=1, eos_ids=(2,)),
}


def parse_xla_options(text: str) -> tuple[tuple[str, bool | int | float | str], ...]:
  """"name=value,name=value" -> RuntimeConfig.xla_options (true/false -> bool, digits -> int). A
  value may itself be a comma list, as XLA's list-valued options are: an item without "=" after an
  option continues that option's value ("xla_gpu_enable_command_buffer=FUSION,CUBLAS,x=1")."""
  items: list[list[str]] = []
  for item in filter(None, (x.strip() for x in text.split(","))):
    name, sep, value = item.partition("=")
    if sep and name.strip():
      items.append([name.strip(), value.strip()])
    elif not sep and items:
      items[-1][1] += "," + item
    else:
      raise ValueError(f"XLA option {item!r} is not name=value")
  out = []
  for name, v in items:
    low = v.lower()
    parsed = True if low == "true" else False if low == "false" else int(v) if v.lstrip("-").isdigit() else v
    out.append((name, parsed))
  return tuple(out)


SAMPLERS = ("auto", "branch", "branch-free", "window")
SAMPLER_WINDOW = 64  # the most tokens sampler "window" keeps (kvrm_jax.step.sampling.K_MAX)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """Static sizes of the KV-RM runtime; they fix every compiled shape.

  max_slots: decode batch (sequences decoded together each step).
  num_blocks: physical blocks in the device pool per layer, block 0 included (the null block).
  max_blocks_per_seq: length of one block table row; bounds a sequence to that many * block_size tokens.
  max_groups: transfer groups (coalesced runs of contiguous physical blocks) per sequence.
  max_moves: block moves (compaction) per step.
  prefill_buckets: chunk sizes of the prefill step, ascending; one compile each.
  max_prefill_seqs: prompt chunks (rows) per prefill step.
  max_summaries: far-history summary entries per sequence the step can read (<= block_size);
    0 (the default) compiles the decode step without the summary merge (two small GEMMs and a few
    kernels per layer saved); set it to serve summaries (SummaryConfig.max_entries <= it).
  max_folds: blocks folded into summaries per step.
  watermark_blocks: blocks admission keeps free for the growth of running sequences.
  layer_loop: "scan" runs the layers under `lax.scan` over the stacked weights; "unroll" runs a
    Python loop with static per-layer weight slices (same math, one compile L times larger);
    "auto": unroll on GPU, scan elsewhere (kvrm_jax/step/steps.py `unrolled`).
  host_blocks: blocks of the pinned-host KV tier (kvrm_jax/sched/tier.py), the null extent included;
    0 = no host tier. Host blocks are handed out in extents of host_extent blocks: one extent is
    one host<->device transfer (a coalesced group).
  max_swap_extents: extents swapped out and in per step (each direction).
  max_host_reads: host extents the decode step stages per layer (cold blocks of running
    sequences kept on the host); 0 = every block a step reads is on the device.
  max_host_blocks_per_seq: host-resident blocks one running sequence may have.
  step_tokens: token budget of one mixed step; 0 (the default) runs a step's prompt chunks as a
    separate padded prefill call before the decode call. > 0: every engine step is one device
    call holding each running sequence's decode token plus prompt chunks (first come, first
    served; a long prompt split across steps) packed into query tiles of `tile` tokens, at most
    step_tokens tokens in all (decode tokens + tiles * tile). The tile counts compiled are
    `tile_buckets` (one executable each, compiled when first used); a step with no prompt work is
    the decode step. Must be >= max_slots + tile (every step has room for one tile).
  tile: query tokens per tile of a mixed step; each tile belongs to one sequence's chunk.
  tile_counts: the mixed step's tile counts below max_tiles, ascending; () (the default): powers
    of two. Denser counts pad fewer prompt positions (with 24 among them, a step of 17 tiles runs
    in 24 rather than 32) for one more executable each.
  prompt_attention: how prompt chunks (prefill rows, mixed-step tiles) attend to their history:
    "gather" gathers each chunk's whole block table and runs one masked einsum (XLA); "kernel"
    runs the paged tile kernel of the attention backend (pallas_kernels.paged_tile_attention:
    Mosaic GPU on Hopper, Triton on other GPUs, interpret mode with attention="interpret", the
    jnp reference with "reference"), which reads each chunk's keys up to its last position only;
    "auto" is "gather".
  pipeline: plan and dispatch the next decode step before reading the tokens of the one in flight
    (the host's scheduling and packing overlap the device; the step's sampled tokens feed the next
    on the device). Used while only running sequences decode (no prompt work, no admission
    possible, none teacher-forced, no host tier or summaries, no preemption); other steps run as
    without it. A request that ends (EOS, stop string) costs one more token of device work, dropped.
    Outputs are the same as without it.
  decode_buckets: row counts below max_slots for steps with no prompt work, ascending; () (the
    default): every decode step runs max_slots rows. With buckets, such a step runs the smallest
    row count that holds its slots (`decode_rows`, `rows_for`); before a step with nothing in flight
    the scheduler moves requests into the lowest free slots (host state only: their KV stays where
    it is) whenever that lets a smaller count hold them. One compile per count used. The static
    baseline keeps max_slots rows.
  matmul: who runs the projection GEMMs and the LM head (kvrm_jax/step/gemm.py): "xla" (XLA's
    dot) or "skinny" (the weight-streaming Mosaic GPU kernel pallas_kernels.skinny_matmul for calls
    of at most 256 rows in bf16/f16 on Hopper; XLA's dot for the rest).
  xla_options: extra XLA compile options of the decode and prefill steps, ((name, value), ...),
    e.g. (("xla_gpu_enable_triton_gemm", True),); on top of the defaults on GPU (kvrm_jax/step/steps.py
    `compiler_options`: cuBLAS GEMMs in steps of at least CUBLAS_MIN_ROWS rows).
    `parse_xla_options("name=value,...")` reads them from a command line.
  greedy_only: compile the steps with greedy sampling only (argmax; the same tokens as greedy rows
    get otherwise) and refuse requests with temperature > 0. The default steps choose between
    greedy and stochastic sampling with a data-dependent branch (`lax.cond`), which XLA's GPU
    runtime resolves by waiting on the host for the device to reach it (docs/step.md, "Where the
    host waits"); greedy-only steps have no branch.
  sampler: how the steps sample, with the same tokens ("window" aside): "branch" (the stochastic path
    and the top-k / top-p searches run behind `lax.cond`s, only when a row needs them),
    "branch-free" (every route runs on every step, with no branch in the step, so a step call
    returns before the device finishes it and RuntimeConfig.pipeline can hide the host;
    kvrm_jax/step/sampling.py), or "auto" (the default: branch-free with `pipeline` on a GPU, else
    branch; `kvrm_jax.step.sampling.resolve_branch_free` says which). A CPU runs every route's
    work in the branch-free steps too, and there the searches cost far more than any wait. On an
    H200 at 148 rows x 512 tokens of context (Llama-3-8B shape), branch-free steps took about
    2.1 ms more device time (14.5 vs 12.4-12.5 ms back to back) and the pipelined loop 1.1-1.9 ms
    less (14.4 vs 15.5 ms a step sampled, 14.3 vs 16.3 greedy; docs/step.md).
    "window" samples with no branch and no search over the vocabulary, keeping at most the
    SAMPLER_WINDOW (64) most likely tokens: a top_k of 0 with top_p < 1 takes the nucleus of those
    64 tokens, and a top_k above 64 is refused. Its tokens equal the others' for every request
    with 1 <= top_k <= 64, or with top_p 1; for top_p alone they may differ (a nucleus wider than
    64 tokens is cut to them, as llama.cpp's default top-k 40 before top-p does). It costs the
    top-k window route only (0.36 against 1.64 ms branch-free at 148 rows on an H100; a sampled
    pipelined step 2.0 % over greedy, docs/step.md).
  """

  block_size: int = 16
  num_blocks: int = 1024
  max_slots: int = 8
  max_blocks_per_seq: int = 64
  max_groups: int = 4
  max_moves: int = 8
  prefill_buckets: tuple[int, ...] = (16, 64, 256)
  max_prefill_seqs: int = 4
  enable_prefix_cache: bool = True
  max_summaries: int = 0
  max_folds: int = 8
  watermark_blocks: int = 0
  dtype: str = "float32"
  attention: str = "auto"  # "auto" | "reference" | "pallas" | "interpret"
  layer_loop: str = "auto"  # "auto" | "scan" | "unroll"
  debug_poison_freed: bool = False
  host_blocks: int = 0
  host_extent: int = 8
  max_swap_extents: int = 0
  max_host_reads: int = 0
  max_host_blocks_per_seq: int = 0
  step_tokens: int = 0
  tile: int = 64
  tile_counts: tuple[int, ...] = ()
  prompt_attention: str = "auto"  # "auto" | "gather" | "kernel"
  pipeline: bool = False
  decode_buckets: tuple[int, ...] = ()
  matmul: str = "xla"  # "xla" | "skinny"
  xla_options: tuple[tuple[str, bool | int | float | str], ...] = ()
  greedy_only: bool = False
  sampler: str = "auto"  # "auto" | "branch" | "branch-free" | "window"

  def __post_init__(self):
    for opt in self.xla_options:
      if not (isinstance(opt, tuple) and len(opt) == 2 and isinstance(opt[0], str)
              and isinstance(opt[1], (bool, int, float, str))):
        raise ValueError(f"xla_options must be (name, value) pairs, got {opt!r}")
    if self.block_size <= 0 or self.block_size & (self.block_size - 1):
      raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
    if self.num_blocks < 2:
      raise ValueError("num_blocks must be >= 2 (block 0 is the reserved null block)")
    for f in ("max_slots", "max_blocks_per_seq", "max_groups", "max_prefill_seqs"):
      if getattr(self, f) <= 0:
        raise ValueError(f"RuntimeConfig.{f} must be positive, got {getattr(self, f)}")
    if not 0 <= self.max_summaries <= self.block_size:
      raise ValueError(f"max_summaries must be in [0, block_size={self.block_size}], got {self.max_summaries}")
    if self.max_moves < 0 or self.watermark_blocks < 0 or self.max_folds < 0:
      raise ValueError("max_moves, max_folds and watermark_blocks must be >= 0")
    if not self.prefill_buckets or list(self.prefill_buckets) != sorted(set(self.prefill_buckets)):
      raise ValueError(f"prefill_buckets must be non-empty and strictly ascending, got {self.prefill_buckets}")
    if self.dtype not in DTYPES:
      raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {DTYPES}")
    if self.attention not in ("auto", "reference", "pallas", "interpret"):
      raise ValueError(f"unknown attention backend {self.attention!r}")
    if self.prompt_attention not in ("auto", "gather", "kernel"):
      raise ValueError(f"unknown prompt_attention {self.prompt_attention!r} (auto | gather | kernel)")
    if self.matmul not in ("xla", "skinny"):
      raise ValueError(f"unknown matmul {self.matmul!r} (xla | skinny)")
    if self.sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r} ({' | '.join(SAMPLERS)})")
    if self.layer_loop not in ("auto", "scan", "unroll"):
      raise ValueError(f"unknown layer_loop {self.layer_loop!r} (auto | scan | unroll)")
    for f in ("host_blocks", "max_swap_extents", "max_host_reads", "max_host_blocks_per_seq"):
      if getattr(self, f) < 0:
        raise ValueError(f"RuntimeConfig.{f} must be >= 0, got {getattr(self, f)}")
    if self.host_blocks:
      if self.host_extent <= 0:
        raise ValueError(f"host_extent must be positive, got {self.host_extent}")
      if self.host_blocks < 2 * self.host_extent:
        raise ValueError(f"host_blocks={self.host_blocks} must hold at least two extents of "
                         f"host_extent={self.host_extent} (extent 0 is the null extent)")
    elif self.max_swap_extents or self.max_host_reads:
      raise ValueError("max_swap_extents / max_host_reads need a host tier (host_blocks > 0)")
    if self.max_host_reads and not self.max_swap_extents:
      raise ValueError("max_host_reads needs max_swap_extents > 0 (blocks reach the host through swap-out copies)")
    if bool(self.max_host_reads) != bool(self.max_host_blocks_per_seq):
      raise ValueError("max_host_reads and max_host_blocks_per_seq are set together (both 0 or both > 0)")
    if self.tile <= 0:
      raise ValueError(f"tile must be positive, got {self.tile}")
    b = self.decode_buckets
    if list(b) != sorted(set(b)) or any(not isinstance(n, int) or not 0 < n < self.max_slots for n in b):
      raise ValueError(f"decode_buckets must be strictly ascending row counts in [1, max_slots={self.max_slots}), "
                       f"got {b}")
    if self.step_tokens < 0 or (self.step_tokens and self.step_tokens < self.max_slots + self.tile):
      raise ValueError(f"step_tokens must be 0 (separate prefill calls) or >= max_slots + tile = "
                       f"{self.max_slots + self.tile}, got {self.step_tokens}")
    c = self.tile_counts
    if c and not self.step_tokens:
      raise ValueError("tile_counts need mixed steps (step_tokens > 0)")
    if list(c) != sorted(set(c)) or any(not isinstance(n, int) or not 0 < n < self.max_tiles for n in c):
      raise ValueError(f"tile_counts must be strictly ascending tile counts in [1, max_tiles={self.max_tiles}) "
                       f"(step_tokens {self.step_tokens}, {self.max_slots} slots, tiles of {self.tile}), got {c}")

  @property
  def max_tiles(self) -> int:
    """Most query tiles one mixed step holds (its decode tokens aside): what step_tokens leaves,
    at most what max_slots prompts of max_seq_len tokens can fill."""
    if not self.step_tokens:
      return 0
    return min((self.step_tokens - self.max_slots) // self.tile, self.max_slots * -(-self.max_seq_len // self.tile))

  @property
  def tile_buckets(self) -> tuple[int, ...]:
    """Tile counts of the mixed step's executables: tile_counts (default powers of two below
    max_tiles), and max_tiles."""
    if not self.step_tokens:
      return ()
    if self.tile_counts:
      return tuple(self.tile_counts) + (self.max_tiles,)
    out, n = [], 1
    while n < self.max_tiles:
      out.append(n)
      n *= 2
    return tuple(out) + (self.max_tiles,)

  @property
  def decode_rows(self) -> tuple[int, ...]:
    """Row counts of the decode step's executables: decode_buckets, then max_slots."""
    return tuple(self.decode_buckets) + (self.max_slots,)

  def rows_for(self, n: int) -> int:
    """The smallest decode row count that holds slots 0..n-1."""
    return next(r for r in self.decode_rows if r >= n)

  @property
  def host_extents(self) -> int:
    """Extents of the host tier, the null extent 0 included."""
    return self.host_blocks // self.host_extent if self.host_blocks else 0

  @property
  def max_seq_len(self) -> int:
    return self.max_blocks_per_seq * self.block_size

  @property
  def table_width(self) -> int:
    """Columns of a block-table row in the descriptor: max_blocks_per_seq rounded up to a multiple
    of 4 (rows of whole 16-byte units, which the Mosaic GPU kernels read themselves by TMA). The
    extra columns stay 0 and are never read: lengths bound every read."""
    return -(-self.max_blocks_per_seq // 4) * 4
