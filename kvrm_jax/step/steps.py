"""The compiled steps: one decode step per runtime configuration, one prefill step per chunk bucket,
one mixed step per tile bucket (RuntimeConfig.step_tokens > 0).

    decode_step(state, k_pool, v_pool, ints, floats) -> (tokens [S], k_pool, v_pool)
    prefill_step(state, k_pool, v_pool, ints, floats) -> (tokens [P], k_pool, v_pool)
    mixed_step(state, k_pool, v_pool, ints, floats) -> (tokens [S + N], k_pool, v_pool)

Pure functions of pytrees; the pools are donated; `ints, floats` are the packed descriptor
(kvrm_jax/descriptor.py). Each layer writes its new K/V into the pool (step/block_ops.py) and
attends over the paged history (step/attention.py), merging the host tier's blocks
(step/tier.py) or the summary rows (step/summaries.py) when present; sampling is on device
(step/sampling.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvrm_jax import descriptor as desc_lib
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.model import llama as model_lib
from kvrm_jax.sched.request import FEED_TOKEN  # a slot whose input is the previous step's output
from kvrm_jax.step import sharding
from kvrm_jax.step import tier
from kvrm_jax.step.attention import block_mass, decode_attention, decode_descriptors, resolve_attention, tile_attention
from kvrm_jax.step.block_ops import block_ops, write_kv
from kvrm_jax.step.gemm import projection_matmul
from kvrm_jax.step.sampling import sample, step_sampling
from kvrm_jax.step.summaries import merge_summaries
from pallas_kernels.partition import merge_lse


def unrolled(rt: RuntimeConfig) -> bool:
  """Layer loop: unrolled on GPU (auto), where XLA's GEMMs then read each layer's weights in place;
  under `lax.scan` each layer's weight slice is first copied (measured on an H100: 9.5 of 25.6 ms
  of a Llama-3-8B step, docs/step.md). scan compiles faster (CPU default)."""
  if rt.layer_loop == "auto":
    return jax.default_backend() == "gpu"
  return rt.layer_loop == "unroll"


# XLA compile options of the steps on GPU (RuntimeConfig.xla_options adds to / overrides them).
DEFAULT_XLA_OPTIONS: dict[str, bool | int | float | str] = {}

# Steps whose GEMMs have at least this many rows (token positions) run them on cuBLAS rather than
# XLA's Triton GEMMs on GPU. Measured in whole steps of the Llama-3-8B shape on an H100 (docs/step.md,
# "Which library runs the GEMMs"): decode steps of 32 and 148 rows 5 % and 7-11 % faster, 64 rows the
# same, mixed steps of 660 and 2,196 tokens 13 % and 10 % faster, and a mixed step compiled in 22
# instead of 71 s (cuBLAS's algorithm choice is quicker than autotuning Triton tilings). Steps of
# fewer rows keep XLA's default: a GEMM alone at 8 rows ran 2-3x slower on cuBLAS for the small
# weights. `xla_options=(("xla_gpu_enable_triton_gemm", True),)` restores Triton everywhere.
# Half-precision steps only: that is what was measured, and float32 steps (the exact runs the GPU
# tests compare with each other and with the dense reference) keep one GEMM library at every size.
CUBLAS_MIN_ROWS = 32


def compiler_options(rt: RuntimeConfig, rows: int = 0) -> dict | None:
  """XLA compile options of a step whose GEMMs have `rows` rows, on this backend (None: XLA's
  defaults): DEFAULT_XLA_OPTIONS, cuBLAS GEMMs from CUBLAS_MIN_ROWS rows up in half-precision
  steps, then rt.xla_options."""
  gpu = jax.default_backend() == "gpu"
  opts = dict(DEFAULT_XLA_OPTIONS) if gpu else {}
  if gpu and rows >= CUBLAS_MIN_ROWS and rt.dtype != "float32":
    opts["xla_gpu_enable_triton_gemm"] = False
  opts.update(dict(rt.xla_options))
  return opts or None


def _reduce(tp_axis):
  return None if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))


def _decode_rows(cfg: ModelConfig, rt: RuntimeConfig, backend: str, with_mass: bool, d, desc, host):
  """One layer's attention of the decode rows (one token per slot) over pools that already hold
  this step's K/V: (layer, q [S, H, E], kp, vp, mass) -> (o [S, H, E], mass). Merges the host
  tier's blocks and the summary rows when the configuration has them."""
  mass_layer = cfg.num_layers - 1

  def rows(layer, q, kp, vp, mass):
    o, lse = decode_attention(backend, q, kp, vp, layer, d, desc)
    if rt.max_host_reads:  # cold blocks on the host tier: stage this layer's extents, merge exactly
      kh, vh = host

      def with_host(o, lse):
        sk = tier.stage(kh, layer, d["host_reads"], d["host_n"][0], rt.host_extent)
        sv = tier.stage(vh, layer, d["host_reads"], d["host_n"][0], rt.host_extent)
        oh, lseh = tier.host_attention(q, sk, sv, d["host_table"], d["host_count"], rt.block_size)
        om, lsem = merge_lse([o, oh], [lse, lseh], base2=False)
        return om.astype(o.dtype), lsem.astype(lse.dtype)

      # Steps without host-resident blocks skip the staging and the extra attention entirely.
      o, lse = jax.lax.cond(d["host_n"][0] > 0, with_host, lambda o, lse: (o, lse), o, lse)
    if rt.max_summaries:
      o = merge_summaries(o, lse, q, kp, vp, layer, d)
    if with_mass:  # statistics for the attention-mass placement policy, from one layer
      if isinstance(layer, int):  # unrolled layers
        mass = block_mass(q, kp, layer, d) if layer == mass_layer else mass
      else:
        mass = jax.lax.cond(layer == mass_layer, lambda: block_mass(q, kp, layer, d), lambda: mass)
    return o.astype(q.dtype), mass

  return rows


def _decode(graphdef, cfg: ModelConfig, rt: RuntimeConfig, backend: str, with_logits: bool, tp_axis,
            with_mass: bool, state, k_pool, v_pool, ints, floats, *extra):
  d = desc_lib.decode_layout(rt).unpack(ints, floats)
  host = extra[:2] if rt.max_host_reads else ()
  if rt.pipeline:  # slots whose input is the previous step's output, still on the device
    d["tokens"] = jnp.where(d["tokens"] == FEED_TOKEN, extra[-1].astype(d["tokens"].dtype), d["tokens"])
  k_pool, v_pool = block_ops(k_pool, v_pool, d, rt, backend)
  model = model_lib.merge(graphdef, state)
  # One descriptor for all layers: the kernels add each layer's block offset themselves.
  desc = decode_descriptors(backend, k_pool, k_pool.shape[0] * cfg.q_per_kv, d)
  rows = _decode_rows(cfg, rt, backend, with_mass, d, desc, host)

  def attend(layer, q, k, v, cache):
    kp, vp, mass = cache
    kp = write_kv(kp, layer, d["write_slots"], k)
    vp = write_kv(vp, layer, d["write_slots"], v)
    o, mass = rows(layer, q, kp, vp, mass)
    return o, (kp, vp, mass)

  mass0 = jnp.zeros(d["block_tables"].shape, jnp.float32)
  logits, (k_pool, v_pool, mass) = model(d["tokens"], d["positions"], (k_pool, v_pool, mass0), attend,
                                         reduce=_reduce(tp_axis), unroll=unrolled(rt),
                                         matmul=projection_matmul(rt))
  tokens = sample(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["positions"] + 1,
                  **step_sampling(rt))
  tokens = jnp.where(d["lengths"] > 0, tokens, 0)
  out = (tokens, k_pool, v_pool) + ((logits,) if with_logits else ())
  if with_mass:
    out += (mass if tp_axis is None else jax.lax.pmean(mass, tp_axis),)
  return out


def _prefill(graphdef, cfg: ModelConfig, rt: RuntimeConfig, backend: str, chunk: int, with_logits: bool, tp_axis,
             state, k_pool, v_pool, ints, floats):
  d = desc_lib.prefill_layout(rt, chunk).unpack(ints, floats)
  k_pool, v_pool = block_ops(k_pool, v_pool, d, rt, backend)
  p = rt.max_prefill_seqs
  model = model_lib.merge(graphdef, state)
  slots = d["write_slots"].reshape(-1)

  def attend(layer, q, k, v, cache):
    kp, vp = cache
    kp = write_kv(kp, layer, slots, k)
    vp = write_kv(vp, layer, slots, v)
    o = tile_attention(backend, rt.prompt_attention, q.reshape(p, chunk, *q.shape[1:]), kp, vp, layer, d)
    return o.reshape(q.shape), (kp, vp)

  last = jnp.arange(p) * chunk + d["last_index"]
  logits, (k_pool, v_pool) = model(d["tokens"].reshape(-1), d["positions"].reshape(-1), (k_pool, v_pool),
                                   attend, logits_index=last, reduce=_reduce(tp_axis),
                                   unroll=unrolled(rt), matmul=projection_matmul(rt))
  # The sampled token's position (prefill rows hold no summaries: lengths == last position + 1).
  tokens = sample(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["lengths"],
                  **step_sampling(rt))
  tokens = jnp.where(d["lengths"] > 0, tokens, 0)
  return (tokens, k_pool, v_pool, logits) if with_logits else (tokens, k_pool, v_pool)


def _mixed(graphdef, cfg: ModelConfig, rt: RuntimeConfig, backend: str, n_tiles: int, with_logits: bool, tp_axis,
           with_mass: bool, state, k_pool, v_pool, ints, floats, *host):
  """The decode step's rows (one token per slot) and n_tiles query tiles of prompt tokens in one
  forward pass over S + n_tiles * tile tokens; tokens [S + n_tiles]: by slot, then by tile."""
  d = desc_lib.mixed_layout(rt, n_tiles).unpack(ints, floats)
  k_pool, v_pool = block_ops(k_pool, v_pool, d, rt, backend)
  s, qt = rt.max_slots, rt.tile
  model = model_lib.merge(graphdef, state)
  desc = decode_descriptors(backend, k_pool, k_pool.shape[0] * cfg.q_per_kv, d)
  rows = _decode_rows(cfg, rt, backend, with_mass, d, desc, host)
  tiles = {"block_tables": d["t_block_tables"], "positions": d["t_positions"], "lengths": d["t_lengths"]}
  write = jnp.concatenate([d["write_slots"], d["t_write_slots"].reshape(-1)])

  def attend(layer, q, k, v, cache):
    kp, vp, mass = cache
    kp = write_kv(kp, layer, write, k)  # every token's K/V first: a tile reads its own chunk from the pool
    vp = write_kv(vp, layer, write, v)
    od, mass = rows(layer, q[:s], kp, vp, mass)
    ot = tile_attention(backend, rt.prompt_attention, q[s:].reshape(n_tiles, qt, *q.shape[1:]), kp, vp, layer, tiles)
    return jnp.concatenate([od, ot.reshape(-1, *q.shape[1:]).astype(q.dtype)]), (kp, vp, mass)

  tokens_in = jnp.concatenate([d["tokens"], d["t_tokens"].reshape(-1)])
  positions_in = jnp.concatenate([d["positions"], d["t_positions"].reshape(-1)])
  last = jnp.concatenate([jnp.arange(s), s + jnp.arange(n_tiles) * qt + d["t_last_index"]])
  mass0 = jnp.zeros(d["block_tables"].shape, jnp.float32)
  logits, (k_pool, v_pool, mass) = model(tokens_in, positions_in, (k_pool, v_pool, mass0), attend,
                                         logits_index=last, reduce=_reduce(tp_axis), unroll=unrolled(rt),
                                         matmul=projection_matmul(rt))
  cat = lambda a, b: jnp.concatenate([d[a], d[b]])  # noqa: E731
  # A decode row samples position+1; a tile its last token's position+1 (= its KV length).
  tokens = sample(logits, cat("temperature", "t_temperature"), cat("top_k", "t_top_k"), cat("top_p", "t_top_p"),
                  cat("seeds", "t_seeds"), jnp.concatenate([d["positions"] + 1, d["t_lengths"]]),
                  **step_sampling(rt))
  tokens = jnp.where(cat("lengths", "t_lengths") > 0, tokens, 0)
  out = (tokens, k_pool, v_pool) + ((logits,) if with_logits else ())
  if with_mass:
    out += (mass if tp_axis is None else jax.lax.pmean(mass, tp_axis),)
  return out


class CompileCounter:
  """Counts traces of the step functions (one trace = one compilation of a new executable)."""

  def __init__(self):
    self.decode = 0
    self.prefill = 0
    self.mixed = 0


def build_steps(graphdef, cfg: ModelConfig, rt: RuntimeConfig, *, with_logits: bool = False,
                counter: CompileCounter | None = None, mesh=None, state_specs=None, with_mass: bool = False):
  """Return (decode_step, prefill_step_for(chunk), mixed_step_for(n_tiles), counter,
  decode_step_for(rows)); steps are jitted with donated pools; decode_step is
  decode_step_for(rt.max_slots). The mixed step takes the decode step's arguments (host pools too).

  With a `mesh`, each step is `jax.jit(jax.shard_map(step))` over the `tp` axis: params sharded
  by `state_specs`, pools over KV heads, descriptor replicated.
  With a host tier that the step reads (rt.max_host_reads), the decode step takes the host K and
  V pools as two more (read-only) arguments; with rt.pipeline, last, the previous decode step's
  tokens [S] (the inputs of slots the descriptor marks FEED_TOKEN). with_mass: the decode step
  also returns each table block's attention mass [S, MB] (the attention placement policy's
  statistics).
  """
  backend = resolve_attention(rt)
  counter = counter or CompileCounter()

  def counted(fn, kind):
    @functools.wraps(fn)
    def inner(*args):  # runs when the step is traced (the model sets its matmul precision itself)
      setattr(counter, kind, getattr(counter, kind) + 1)
      return fn(*args)
    return inner

  tp_axis = None
  wrap = lambda fn, kind: fn  # noqa: E731
  if mesh is not None:
    tp_axis = sharding.AXIS
    n_host = 2 if rt.max_host_reads else 0
    wrap = lambda fn, kind: sharding.shard_step(  # noqa: E731
        fn, mesh, state_specs, int(with_logits) + int(with_mass and kind != "prefill"),
        n_host if kind != "prefill" else 0, n_feed=int(rt.pipeline and kind == "decode"))

  def decode_step(state, k_pool, v_pool, ints, floats, *extra):
    """One decode step of every slot: (state, k_pool, v_pool, ints, floats[, k_host, v_host][, prev])
    -> (tokens [S] int32, k_pool, v_pool[, logits [S, V]][, mass [S, MB]]).

    state: the model's parameter state (`engine.state`); k_pool, v_pool: the KV pools
    [KH, L, N, bs, E] (donated: use the returned ones); ints, floats: the packed descriptor
    (`engine.build_decode_descriptor(plan)`); k_host, v_host: the host tier's pools when the step
    reads them; prev: with RuntimeConfig.pipeline, the tokens of the decode step before, taken as
    the input of each slot the descriptor marks FEED_TOKEN (`engine.decode_args()` gives these
    extra arguments). tokens: each slot's sampled token (0 in empty slots,
    NON_FINITE where the slot's logits were not finite). logits with `with_logits`, the
    attention mass of each table block with `with_mass`. Compiled once per configuration.
    """
    return _decode(graphdef, cfg, rt, backend, with_logits, tp_axis, with_mass, state, k_pool, v_pool, ints,
                   floats, *extra)

  jitted = jax.jit(counted(wrap(decode_step, "decode"), "decode"), donate_argnums=(1, 2),
                   compiler_options=compiler_options(rt, rt.max_slots))
  jitted.__doc__ = decode_step.__doc__  # shard_map's wrapper (with a mesh) keeps no docstring

  @functools.cache
  def decode_step_for(rows: int):
    """The decode step over slots 0..rows-1 (a RuntimeConfig.decode_rows count): its descriptor is
    decode_layout(rt, rows), its outputs [rows, ...]."""
    if rows == rt.max_slots:
      return jitted
    if rows not in rt.decode_rows:
      raise ValueError(f"{rows} rows is not a decode row count {rt.decode_rows}")
    df = functools.partial(_decode, graphdef, cfg, desc_lib.rows_runtime(rt, rows), backend, with_logits, tp_axis,
                           with_mass)
    return jax.jit(counted(wrap(df, "decode"), "decode"), donate_argnums=(1, 2),
                   compiler_options=compiler_options(rt, rows))

  @functools.cache
  def prefill_step(chunk: int):
    if chunk not in rt.prefill_buckets:
      raise ValueError(f"chunk {chunk} is not a prefill bucket {rt.prefill_buckets}")
    pf = functools.partial(_prefill, graphdef, cfg, rt, backend, chunk, with_logits, tp_axis)
    return jax.jit(counted(wrap(pf, "prefill"), "prefill"), donate_argnums=(1, 2),
                   compiler_options=compiler_options(rt, rt.max_prefill_seqs * chunk))

  @functools.cache
  def mixed_step(n_tiles: int):
    if n_tiles not in rt.tile_buckets:
      raise ValueError(f"{n_tiles} tiles is not a mixed-step bucket {rt.tile_buckets}")
    mf = functools.partial(_mixed, graphdef, cfg, rt, backend, n_tiles, with_logits, tp_axis, with_mass)
    return jax.jit(counted(wrap(mf, "mixed"), "mixed"), donate_argnums=(1, 2),
                   compiler_options=compiler_options(rt, rt.max_slots + n_tiles * rt.tile))

  return jitted, prefill_step, mixed_step, counter, decode_step_for


def build_swap(rt: RuntimeConfig, mesh=None, out_shardings=None):
  """The host tier's swap op: (k_pool, v_pool, k_host, v_host, ints) -> the four pools, donated.

  out_shardings: the four pools' shardings; pass them so the host pools stay in host memory."""
  fn = functools.partial(tier.swap_blocks, rt=rt)
  if mesh is not None:
    fn = sharding.shard_swap(fn, mesh)
  return jax.jit(fn, donate_argnums=(0, 1, 2, 3), out_shardings=out_shardings)
