"""The compiled steps: one decode step per runtime configuration, one prefill step per chunk bucket.

    decode_step(state, k_pool, v_pool, ints, floats) -> (tokens [S], k_pool, v_pool)
    prefill_step(state, k_pool, v_pool, ints, floats) -> (tokens [P], k_pool, v_pool)

Pure functions of pytrees; the pools are donated; `ints, floats` are the packed descriptor. The
pool of one model is `[L, K, N, bs, E]` for keys and for values (N physical blocks of bs tokens,
block 0 the null block). Attention over the pool goes through one switch (`RuntimeConfig.attention`):
  reference  pure-jnp gather of each sequence's block table (CPU default)
  pallas     the Pallas kernels of pallas_kernels/ (GPU default)
  interpret  the same Pallas kernels in interpret mode (CPU tests)
  dense      static-graph baseline: each slot owns a fixed contiguous reservation and attention
             reads all of it (what a static executor does); needs N == 1 + S * MB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kvrm_jax import descriptor as desc_lib
from kvrm_jax import model as model_lib
from kvrm_jax.config import ModelConfig, RuntimeConfig


def resolve_attention(rt: RuntimeConfig) -> str:
  if rt.attention != "auto":
    return rt.attention
  return "pallas" if jax.default_backend() == "gpu" else "reference"


def pool_shape(cfg: ModelConfig, rt: RuntimeConfig) -> tuple[int, ...]:
  return (cfg.num_layers, cfg.num_kv_heads, rt.num_blocks, rt.block_size, cfg.head_dim)


def init_pools(cfg: ModelConfig, rt: RuntimeConfig, sharding=None):
  """Zero-filled K and V pools (jnp.empty is uninitialized since jax 0.11)."""
  shape, dt = pool_shape(cfg, rt), jnp.dtype(rt.dtype)
  make = jax.jit(lambda: (jnp.zeros(shape, dt), jnp.zeros(shape, dt)), out_shardings=sharding)
  return make()


# ----------------------------------------------------------------------------- sampling


def sample(logits, temperature, top_k, top_p, seeds, counters):
  """Per-row sampling. logits: [B, V] f32; temperature/top_p: [B] f32; top_k/seeds/counters: [B] int32.

  temperature 0 is greedy. The key of a row is fold_in(key(seed), counter) with counter = the
  position of the token being sampled, so a request samples the same tokens whatever its batch,
  slot or preemption history.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def stochastic():
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [B, V]
    srt = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    k = jnp.where(top_k > 0, top_k, v)[:, None]
    srt = jnp.where(rank < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    srt = jnp.where((cum_before < top_p[:, None]) | (rank == 0), srt, -jnp.inf)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s.astype(jnp.uint32)), c))(seeds, counters)
    choice = jax.vmap(jax.random.categorical)(keys, srt)
    picked = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, picked, greedy)

  return jax.lax.cond(jnp.any(temperature > 0), stochastic, lambda: greedy)


# ----------------------------------------------------------------------------- KV pool access


def write_kv(pool, layer, slots, x):
  """pool: [L, K, N, bs, E]; slots: [T] flat slot ids (block * bs + offset); x: [T, K, E]."""
  bs = pool.shape[3]
  return pool.at[layer, :, slots // bs, slots % bs].set(x.astype(pool.dtype))


def copy_blocks(k_pool, v_pool, moves, backend: str):
  """Block moves [M, 2] (src, dst) for every layer, all reads before writes; (0, 0) rows are no-ops."""
  if backend in ("pallas", "interpret"):
    from pallas_kernels import block_copy
    return block_copy.copy_blocks(k_pool, v_pool, moves, backend="auto" if backend == "pallas" else "interpret",
                                  interpret=backend == "interpret")
  src, dst = moves[:, 0], moves[:, 1]
  return k_pool.at[:, :, dst].set(k_pool[:, :, src]), v_pool.at[:, :, dst].set(v_pool[:, :, src])


def gather_history(pool, layer, block_tables):
  """pool: [L, K, N, bs, E]; block_tables: [B, MB] -> [B, K, MB * bs, E] (logical order)."""
  k = pool[layer][:, block_tables]  # [K, B, MB, bs, E]
  kh, b, mb, bs, e = k.shape
  return k.reshape(kh, b, mb * bs, e).transpose(1, 0, 2, 3)


def dense_history(pool, layer, slots: int):
  """Static baseline: slot s owns blocks 1 + s*MB .. (s+1)*MB, read whole -> [S, K, MB * bs, E]."""
  x = pool[layer][:, 1:]  # [K, S*MB, bs, E]
  kh, n, bs, e = x.shape
  return x.reshape(kh, slots, (n // slots) * bs, e).transpose(1, 0, 2, 3)


def decode_attention(backend, q, k_pool, v_pool, layer, d):
  """q: [S, H, E] -> [S, H, E] over each slot's history of d['lengths'] tokens."""
  if backend in ("pallas", "interpret"):
    from pallas_kernels import paged_attention
    return paged_attention.paged_decode_attention(
        q, k_pool[layer], v_pool[layer], d["lengths"], d["block_tables"], d["groups"], d["num_groups"],
        backend="auto" if backend == "pallas" else "interpret", interpret=backend == "interpret")
  if backend == "dense":
    k, v = dense_history(k_pool, layer, q.shape[0]), dense_history(v_pool, layer, q.shape[0])
  else:
    k, v = gather_history(k_pool, layer, d["block_tables"]), gather_history(v_pool, layer, d["block_tables"])
  mask = jnp.arange(k.shape[2])[None, :] < d["lengths"][:, None]  # [S, Tk]
  return model_lib.attention(q[:, None], k, v, mask[:, None, :])[:, 0]


def chunk_attention(backend, q, k_pool, v_pool, layer, d):
  """Prefill: q [P, C, H, E] attends causally to its row's history (earlier chunks + itself)."""
  if backend == "dense":
    raise ValueError("the dense baseline prefills through the paged path with identity tables")
  k, v = gather_history(k_pool, layer, d["block_tables"]), gather_history(v_pool, layer, d["block_tables"])
  tk = jnp.arange(k.shape[2])[None, None, :]
  mask = (tk <= d["positions"][:, :, None]) & (tk < d["lengths"][:, None, None])  # [P, C, Tk]
  return model_lib.attention(q, k, v, mask)


# ----------------------------------------------------------------------------- steps


def _reduce(tp_axis):
  return None if tp_axis is None else (lambda y: jax.lax.psum(y, tp_axis))


def _decode(graphdef, cfg: ModelConfig, rt: RuntimeConfig, backend: str, with_logits: bool, tp_axis,
            state, k_pool, v_pool, ints, floats):
  d = desc_lib.decode_layout(rt).unpack(ints, floats)
  if rt.max_moves:
    k_pool, v_pool = copy_blocks(k_pool, v_pool, d["moves"], backend)
  model = model_lib.merge(graphdef, state)

  def attend(layer, q, k, v, cache):
    kp, vp = cache
    kp = write_kv(kp, layer, d["write_slots"], k)
    vp = write_kv(vp, layer, d["write_slots"], v)
    return decode_attention(backend, q, kp, vp, layer, d), (kp, vp)

  logits, (k_pool, v_pool) = model(d["tokens"], d["positions"], (k_pool, v_pool), attend, reduce=_reduce(tp_axis))
  tokens = sample(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["lengths"])
  tokens = jnp.where(d["lengths"] > 0, tokens, 0)
  return (tokens, k_pool, v_pool, logits) if with_logits else (tokens, k_pool, v_pool)


def _prefill(graphdef, cfg: ModelConfig, rt: RuntimeConfig, backend: str, chunk: int, with_logits: bool, tp_axis,
             state, k_pool, v_pool, ints, floats):
  d = desc_lib.prefill_layout(rt, chunk).unpack(ints, floats)
  if rt.max_moves:
    k_pool, v_pool = copy_blocks(k_pool, v_pool, d["moves"], backend)
  p = rt.max_prefill_seqs
  model = model_lib.merge(graphdef, state)
  slots = d["write_slots"].reshape(-1)

  def attend(layer, q, k, v, cache):
    kp, vp = cache
    kp = write_kv(kp, layer, slots, k)
    vp = write_kv(vp, layer, slots, v)
    o = chunk_attention("reference" if backend == "dense" else backend, q.reshape(p, chunk, *q.shape[1:]),
                        kp, vp, layer, d)
    return o.reshape(q.shape), (kp, vp)

  last = jnp.arange(p) * chunk + d["last_index"]
  logits, (k_pool, v_pool) = model(d["tokens"].reshape(-1), d["positions"].reshape(-1), (k_pool, v_pool),
                                   attend, logits_index=last, reduce=_reduce(tp_axis))
  tokens = sample(logits, d["temperature"], d["top_k"], d["top_p"], d["seeds"], d["lengths"])
  tokens = jnp.where(d["lengths"] > 0, tokens, 0)
  return (tokens, k_pool, v_pool, logits) if with_logits else (tokens, k_pool, v_pool)


class CompileCounter:
  """Counts traces of the step functions (one trace = one compilation of a new executable)."""

  def __init__(self):
    self.decode = 0
    self.prefill = 0


def build_steps(graphdef, cfg: ModelConfig, rt: RuntimeConfig, *, with_logits: bool = False,
                counter: CompileCounter | None = None, mesh=None, state_specs=None):
  """Return (decode_step, prefill_step_for(chunk), counter); steps are jitted with donated pools.

  With a `mesh`, each step is `jax.jit(jax.shard_map(step))` over the `tp` axis: params sharded
  by `state_specs`, pools over KV heads, descriptor replicated.
  """
  backend = resolve_attention(rt)
  counter = counter or CompileCounter()

  def counted(fn, kind):
    @functools.wraps(fn)
    def inner(*args):
      setattr(counter, kind, getattr(counter, kind) + 1)
      return fn(*args)
    return inner

  tp_axis = None
  wrap = lambda fn, kind: fn  # noqa: E731
  if mesh is not None:
    from kvrm_jax import sharding
    tp_axis = sharding.AXIS
    wrap = lambda fn, kind: sharding.shard_step(fn, mesh, state_specs, int(with_logits))  # noqa: E731
  dec = functools.partial(_decode, graphdef, cfg, rt, backend, with_logits, tp_axis)
  decode_step = jax.jit(counted(wrap(dec, "decode"), "decode"), donate_argnums=(1, 2))

  @functools.cache
  def prefill_step(chunk: int):
    if chunk not in rt.prefill_buckets:
      raise ValueError(f"chunk {chunk} is not a prefill bucket {rt.prefill_buckets}")
    pf = functools.partial(_prefill, graphdef, cfg, rt, backend, chunk, with_logits, tp_axis)
    return jax.jit(counted(wrap(pf, "prefill"), "prefill"), donate_argnums=(1, 2))

  return decode_step, prefill_step, counter
