"""The compiled steps: one decode step per runtime configuration, one prefill step per chunk bucket.

    decode_step(state, k_pool, v_pool, ints, floats) -> (tokens [S], k_pool, v_pool)
    prefill_step(state, k_pool, v_pool, ints, floats) -> (tokens [P], k_pool, v_pool)

Pure functions of pytrees; the pools are donated; `ints, floats` are the packed descriptor. The
pool of one model is `[K, L, N, bs, E]` for keys and for values (N physical blocks of bs tokens
per layer, block 0 the null block), KV heads outermost: for one head all layers' blocks form one
[L * N, bs, E] array, so layer l's block b is block l * N + b there and the attention kernel reads
any layer in place (no per-layer slice). Attention goes through one switch (`RuntimeConfig.attention`):
  reference  pure-jnp gather of each sequence's block table (CPU default)
  pallas     the Pallas kernels of pallas_kernels/ (GPU default: Mosaic GPU on Hopper)
  interpret  the same Pallas kernels in interpret mode (CPU tests)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kvrm_jax import descriptor as desc_lib
from kvrm_jax import model as model_lib
from kvrm_jax.config import ModelConfig, RuntimeConfig
from kvrm_jax.sampling import NON_FINITE, sample  # noqa: F401  (used by the steps; re-exported)


def resolve_attention(rt: RuntimeConfig) -> str:
  if rt.attention != "auto":
    return rt.attention
  return "pallas" if jax.default_backend() == "gpu" else "reference"


def unrolled(rt: RuntimeConfig) -> bool:
  """Layer loop: unrolled on GPU (auto), where XLA's GEMMs then read each layer's weights in place;
  under `lax.scan` each layer's weight slice is first copied (measured on an H100: 9.5 of 25.6 ms
  of a Llama-3-8B step, docs/step.md). scan compiles faster (CPU default)."""
  if rt.layer_loop == "auto":
    return jax.default_backend() == "gpu"
  return rt.layer_loop == "unroll"


# XLA compile options of the steps on GPU (RuntimeConfig.xla_options adds to / overrides them).
DEFAULT_XLA_OPTIONS: dict[str, bool | int | float | str] = {}


def compiler_options(rt: RuntimeConfig) -> dict | None:
  """The steps' XLA compile options on this backend (None: XLA's defaults)."""
  opts = dict(DEFAULT_XLA_OPTIONS) if jax.default_backend() == "gpu" else {}
  opts.update(dict(rt.xla_options))
  return opts or None


def pool_shape(cfg: ModelConfig, rt: RuntimeConfig) -> tuple[int, ...]:
  return (cfg.num_kv_heads, cfg.num_layers, rt.num_blocks, rt.block_size, cfg.head_dim)


def init_pools(cfg: ModelConfig, rt: RuntimeConfig, sharding=None):
  """Zero-filled K and V pools (jnp.empty is uninitialized since jax 0.11)."""
  shape, dt = pool_shape(cfg, rt), jnp.dtype(rt.dtype)
  make = jax.jit(lambda: (jnp.zeros(shape, dt), jnp.zeros(shape, dt)), out_shardings=sharding)
  return make()


# ----------------------------------------------------------------------------- KV pool access


def write_kv(pool, layer, slots, x):
  """pool: [K, L, N, bs, E]; slots: [T] flat slot ids (block * bs + offset); x: [T, K, E]."""
  bs = pool.shape[3]
  return pool.at[:, layer, slots // bs, slots % bs].set(x.transpose(1, 0, 2).astype(pool.dtype))


def layer_view(pool, layer, block_ids):
  """pool [K, L, N, bs, E] as [K, L * N, bs, E] and layer-local block ids shifted into it."""
  kh, nl, n, bs, e = pool.shape
  return pool.reshape(kh, nl * n, bs, e), block_ids + layer * n


def fold_blocks(pool, folds, fold_w):
  """Far-history summaries: dst row = w_old * dst row + w_new * mean(src block), all layers and heads.

  pool: [K, L, N, bs, E]; folds: [F, 2] int32 (src block, dst flat slot); fold_w: [F, 2] f32.
  Rows with w_new == 0 are no-ops (padding).
  """
  bs = pool.shape[3]
  src, dst = folds[:, 0], folds[:, 1]
  mean = pool[:, :, src].astype(jnp.float32).mean(axis=3)  # [K, L, F, E]
  old = pool[:, :, dst // bs, dst % bs].astype(jnp.float32)  # [K, L, F, E]
  w_old, w_new = fold_w[:, 0][:, None], fold_w[:, 1][:, None]
  new = jnp.where(w_new > 0, w_old * old + w_new * mean, old)
  return pool.at[:, :, dst // bs, dst % bs].set(new.astype(pool.dtype))


def block_ops(k_pool, v_pool, d, rt: RuntimeConfig, backend: str):
  """Start of a step, before any KV is read or written: summary folds (they read blocks the
  pager just freed), then block copies (copy-on-write + compaction, which may reuse those)."""
  if rt.max_folds:
    k_pool, v_pool = fold_blocks(k_pool, d["folds"], d["fold_w"]), fold_blocks(v_pool, d["folds"], d["fold_w"])
  if rt.max_moves:
    k_pool, v_pool = copy_blocks(k_pool, v_pool, d["moves"], backend)
  return k_pool, v_pool


def copy_blocks(k_pool, v_pool, moves, backend: str):
  """Block moves [M, 2] (src, dst) for every layer, all reads before writes; (0, 0) rows are no-ops.

  The kernel's [L, Hkv, N, bs, D] is our [K, L, N, bs, E]: it copies a block for every pair of
  leading indices either way."""
  if backend in ("pallas", "interpret"):
    from pallas_kernels import block_copy
    return block_copy.copy_blocks(k_pool, v_pool, moves, backend="auto", interpret=backend == "interpret")
  src, dst = moves[:, 0], moves[:, 1]
  return k_pool.at[:, :, dst].set(k_pool[:, :, src]), v_pool.at[:, :, dst].set(v_pool[:, :, src])


def gather_history(pool, layer, block_tables):
  """pool: [K, L, N, bs, E]; block_tables: [B, MB] -> [B, K, MB * bs, E] (logical order)."""
  flat, ids = layer_view(pool, layer, block_tables)
  k = flat[:, ids]  # [K, B, MB, bs, E]
  kh, b, mb, bs, e = k.shape
  return k.reshape(kh, b, mb * bs, e).transpose(1, 0, 2, 3)


def _attention_backend(backend):
  return dict(backend="auto" if backend == "pallas" else "interpret", interpret=backend == "interpret")


def decode_descriptors(backend, k_pool, num_heads, d):
  """The attention kernels' descriptor rows for this step, built once for all layers (None on the
  reference path). k_pool: [K, L, N, bs, E] (this shard's); num_heads: this shard's q heads."""
  if backend not in ("pallas", "interpret"):
    return None
  from pallas_kernels import paged_attention
  kh, nl, n, bs, e = k_pool.shape
  q = jax.ShapeDtypeStruct((d["lengths"].shape[0], num_heads, e), k_pool.dtype)
  flat = jax.ShapeDtypeStruct((kh, nl * n, bs, e), k_pool.dtype)
  return paged_attention.decode_descriptors(q, flat, d["lengths"], d["block_tables"], d["groups"],
                                            d["num_groups"], **_attention_backend(backend))


def decode_attention(backend, q, k_pool, v_pool, layer, d, desc=None):
  """q: [S, H, E] -> (o [S, H, E] f32, lse [S, H]) over each slot's exact history (d['lengths']).

  desc: this step's `decode_descriptors` (the kernels read layer `layer` through a block offset)."""
  if backend in ("pallas", "interpret"):
    from pallas_kernels import paged_attention
    (kf, offset), (vf, _) = layer_view(k_pool, layer, 0), layer_view(v_pool, layer, 0)
    return paged_attention.paged_decode_attention(
        q, kf, vf, d["lengths"], d["block_tables"], d["groups"], d["num_groups"],
        block_offset=offset, desc=desc, return_lse=True, **_attention_backend(backend))
  k, v = gather_history(k_pool, layer, d["block_tables"]), gather_history(v_pool, layer, d["block_tables"])
  mask = jnp.arange(k.shape[2])[None, :] < d["lengths"][:, None]  # [S, Tk]
  o, lse = model_lib.attention(q[:, None], k, v, mask[:, None, :], return_lse=True)
  return o[:, 0], lse[:, 0]


def merge_summaries(o, lse, q, k_pool, v_pool, layer, d):
  """Add each slot's far-history summary rows to its exact attention (o, lse) -> [S, H, E].

  A summary row j (mean key/value of c_j folded tokens) enters the softmax with logit
  q.k_j * scale + log(c_j), so its mass matches the c_j tokens it stands for. Slots without
  summaries keep `o` exactly (the same executable serves summaries on and off).
  """
  s, h, e = q.shape
  bs = k_pool.shape[3]
  ss, cnt = d["summary_slots"], d["summary_counts"]  # [S, Ks]
  ks = k_pool[:, layer, ss // bs, ss % bs].astype(jnp.float32)  # [K, S, Ks, E]
  vs = v_pool[:, layer, ss // bs, ss % bs].astype(jnp.float32)
  kh = ks.shape[0]
  qg = q.reshape(s, kh, h // kh, e).astype(jnp.float32)
  valid = (cnt > 0)[:, None, None, :]  # [S, 1, 1, Ks]
  sc = jnp.einsum("skge,ksje->skgj", qg, ks) / math.sqrt(e) + jnp.log(jnp.maximum(cnt, 1.0))[:, None, None, :]
  sc = jnp.where(valid, sc, -jnp.inf)
  lse = lse.reshape(s, kh, h // kh)
  m = jnp.maximum(lse, jnp.max(sc, axis=-1))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w_ex = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)
  p = jnp.where(valid, jnp.exp(sc - m[..., None]), 0.0)
  num = o.reshape(s, kh, h // kh, e).astype(jnp.float32) * w_ex[..., None] + \
      jnp.einsum("skgj,ksje->skge", p, jnp.where(jnp.isfinite(vs), vs, 0.0))
  den = w_ex + jnp.sum(p, axis=-1)
  merged = (num / jnp.where(den > 0, den, 1.0)[..., None]).reshape(s, h, e)
  return jnp.where(jnp.any(cnt > 0, axis=-1)[:, None, None], merged, o.astype(jnp.float32))


def chunk_attention(q, k_pool, v_pool, layer, d):
  """Prefill: q [P, C, H, E] attends causally to its row's history (earlier chunks + itself).

  An XLA gather + einsum: prefill chunks are compute-bound matmuls XLA already tiles well."""
  k, v = gather_history(k_pool, layer, d["block_tables"]), gather_history(v_pool, layer, d["block_tables"])
  tk = jnp.arange(k.shape[2])[None, None, :]
  mask = (tk <= d["positions"][:, :, None]) & (tk < d["lengths"][:, None, None])  # [P, C, Tk]
  return model_lib.attention(q, k, v, mask)


# ----------------------------------------------------------------------------- steps


def _reduce(tp_axis):
  return None if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))


def block_mass(q, k_pool, layer, d):
  """Softmax mass of each table block, mean over this shard's heads: [S, MB] f32 (one layer)."""
  k = gather_history(k_pool, layer, d["block_tables"]).astype(jnp.float32)  # [S, K, MB*bs, E]
  s, kh, t, e = k.shape
  qg = q.reshape(s, kh, -1, e).astype(jnp.float32)
  sc = jnp.einsum("skge,skte->skgt", qg, k) / math.sqrt(e)
  sc = jnp.where((jnp.arange(t)[None, :] < d["lengths"][:, None])[:, None, None, :], sc, -jnp.inf)
  p = jax.nn.softmax(sc, axis=-1)
  p = jnp.where(jnp.isfinite(p), p, 0.0)
  mb = d["block_tables"].shape[1]
  return p.reshape(s, kh * p.shape[2], mb, t // mb).sum(-1).mean(1)


def _decode(graphdef, cfg: ModelConfig, rt: RuntimeConfig, backend: str, with_logits: bool, tp_axis,
            with_mass: bool, state, k_pool, v_pool, ints, floats, *host):
  d = desc_lib.decode_layout(rt).unpack(ints, floats)
  k_pool, v_pool = block_ops(k_pool, v_pool, d, rt, backend)
  model = model_lib.merge(graphdef, state)
  mass_layer = cfg.num_layers - 1
  # One descriptor for all layers: the kernels add each layer's block offset themselves.
  desc = decode_descriptors(backend, k_pool, k_pool.shape[0] * cfg.q_per_kv, d)

  def attend(layer, q, k, v, cache):
    kp, vp, mass = cache
    kp = write_kv(kp, layer, d["write_slots"], k)
    vp = write_kv(vp, layer, d["write_slots"], v)
    o, lse = decode_attention(backend, q, kp, vp, layer, d, desc)
    if rt.max_host_reads:  # cold blocks on the host tier: stage this layer's extents, merge exactly
      from kvrm_jax import tier
      kh, vh = host

      def with_host(o, lse):
        sk = tier.stage(kh, layer, d["host_reads"], d["host_n"][0], rt.host_extent)
        sv = tier.stage(vh, layer, d["host_reads"], d["host_n"][0], rt.host_extent)
        oh, lseh = tier.host_attention(q, sk, sv, d["host_table"], d["host_count"], rt.block_size)
        om, lsem = tier.combine(o, lse, oh, lseh)
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
    return o.astype(q.dtype), (kp, vp, mass)

  mass0 = jnp.zeros(d["block_tables"].shape, jnp.float32)
  logits, (k_pool, v_pool, mass) = model(d["tokens"], d["positions"], (k_pool, v_pool, mass0), attend,
                                         reduce=_reduce(tp_axis), unroll=unrolled(rt))
  tokens = sample(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["positions"] + 1)
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
    o = chunk_attention(q.reshape(p, chunk, *q.shape[1:]), kp, vp, layer, d)
    return o.reshape(q.shape), (kp, vp)

  last = jnp.arange(p) * chunk + d["last_index"]
  logits, (k_pool, v_pool) = model(d["tokens"].reshape(-1), d["positions"].reshape(-1), (k_pool, v_pool),
                                   attend, logits_index=last, reduce=_reduce(tp_axis),
                                   unroll=unrolled(rt))
  # The sampled token's position (prefill rows hold no summaries: lengths == last position + 1).
  tokens = sample(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["lengths"])
  tokens = jnp.where(d["lengths"] > 0, tokens, 0)
  return (tokens, k_pool, v_pool, logits) if with_logits else (tokens, k_pool, v_pool)


class CompileCounter:
  """Counts traces of the step functions (one trace = one compilation of a new executable)."""

  def __init__(self):
    self.decode = 0
    self.prefill = 0


def build_steps(graphdef, cfg: ModelConfig, rt: RuntimeConfig, *, with_logits: bool = False,
                counter: CompileCounter | None = None, mesh=None, state_specs=None, with_mass: bool = False):
  """Return (decode_step, prefill_step_for(chunk), counter); steps are jitted with donated pools.

  With a `mesh`, each step is `jax.jit(jax.shard_map(step))` over the `tp` axis: params sharded
  by `state_specs`, pools over KV heads, descriptor replicated.
  With a host tier that the step reads (rt.max_host_reads), the decode step takes the host K and
  V pools as two more (read-only) arguments. with_mass: the decode step also returns each table
  block's attention mass [S, MB] (the attention placement policy's statistics).
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
    from kvrm_jax import sharding
    tp_axis = sharding.AXIS
    n_host = 2 if rt.max_host_reads else 0
    wrap = lambda fn, kind: sharding.shard_step(  # noqa: E731
        fn, mesh, state_specs, int(with_logits) + int(with_mass and kind == "decode"),
        n_host if kind == "decode" else 0)

  def decode_step(state, k_pool, v_pool, ints, floats, *host):
    """One decode step of every slot: (state, k_pool, v_pool, ints, floats[, k_host, v_host]) ->
    (tokens [S] int32, k_pool, v_pool[, logits [S, V]][, mass [S, MB]]).

    state: the model's parameter state (`engine.state`); k_pool, v_pool: the KV pools
    [KH, L, N, bs, E] (donated: use the returned ones); ints, floats: the packed descriptor
    (`engine.build_decode_descriptor(plan)`); k_host, v_host: the host tier's pools when the step
    reads them (`engine.decode_host_args()`). tokens: each slot's sampled token (0 in empty slots,
    step.NON_FINITE where the slot's logits were not finite). logits with `with_logits`, the
    attention mass of each table block with `with_mass`. Compiled once per configuration.
    """
    return _decode(graphdef, cfg, rt, backend, with_logits, tp_axis, with_mass, state, k_pool, v_pool, ints,
                   floats, *host)

  opts = compiler_options(rt)
  jitted = jax.jit(counted(wrap(decode_step, "decode"), "decode"), donate_argnums=(1, 2), compiler_options=opts)
  jitted.__doc__ = decode_step.__doc__  # shard_map's wrapper (with a mesh) keeps no docstring

  @functools.cache
  def prefill_step(chunk: int):
    if chunk not in rt.prefill_buckets:
      raise ValueError(f"chunk {chunk} is not a prefill bucket {rt.prefill_buckets}")
    pf = functools.partial(_prefill, graphdef, cfg, rt, backend, chunk, with_logits, tp_axis)
    return jax.jit(counted(wrap(pf, "prefill"), "prefill"), donate_argnums=(1, 2), compiler_options=opts)

  return jitted, prefill_step, counter


def build_swap(rt: RuntimeConfig, mesh=None, out_shardings=None):
  """The host tier's swap op: (k_pool, v_pool, k_host, v_host, ints) -> the four pools, donated.

  out_shardings: the four pools' shardings; pass them so the host pools stay in host memory."""
  from kvrm_jax import tier
  fn = functools.partial(tier.swap_blocks, rt=rt)
  if mesh is not None:
    from kvrm_jax import sharding
    fn = sharding.shard_swap(fn, mesh)
  return jax.jit(fn, donate_argnums=(0, 1, 2, 3), out_shardings=out_shardings)
