"""KV pool access inside the compiled steps: writing new K/V, the per-layer view of the pool,
summary folds and block copies.

The pool of one model is `[K, L, N, bs, E]` for keys and for values (N physical blocks of bs tokens
per layer, block 0 the null block), KV heads outermost: for one head all layers' blocks form one
[L * N, bs, E] array, so layer l's block b is block l * N + b there and the attention kernel reads
any layer in place (no per-layer slice).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvrm_jax.config import ModelConfig, RuntimeConfig
from pallas_kernels import block_copy


def pool_shape(cfg: ModelConfig, rt: RuntimeConfig) -> tuple[int, ...]:
  return (cfg.num_kv_heads, cfg.num_layers, rt.num_blocks, rt.block_size, cfg.head_dim)


def init_pools(cfg: ModelConfig, rt: RuntimeConfig, sharding=None):
  """Zero-filled K and V pools (jnp.empty is uninitialized since jax 0.11)."""
  shape, dt = pool_shape(cfg, rt), jnp.dtype(rt.dtype)
  make = jax.jit(lambda: (jnp.zeros(shape, dt), jnp.zeros(shape, dt)), out_shardings=sharding)
  return make()


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
    return block_copy.copy_blocks(k_pool, v_pool, moves, backend="auto", interpret=backend == "interpret")
  src, dst = moves[:, 0], moves[:, 1]
  return k_pool.at[:, :, dst].set(k_pool[:, :, src]), v_pool.at[:, :, dst].set(v_pool[:, :, src])


def _poison(k_pool, v_pool, idx):
  return k_pool.at[:, :, idx].set(jnp.nan), v_pool.at[:, :, idx].set(jnp.nan)


@functools.cache
def _poison_for(shardings):
  return jax.jit(_poison, out_shardings=shardings)  # the pools keep their placement: the steps take nothing else


def poison_blocks(k_pool, v_pool, blocks: list[int]):
  """Debug (RuntimeConfig.debug_poison_freed): fill these blocks of both pools with NaN, so that
  any later read of them would show. Block lists are padded to powers of two (few compiles)."""
  assert 0 < min(blocks) and max(blocks) < k_pool.shape[2]  # never the null block, never past the pool
  idx = np.zeros((1 << max(0, (len(blocks) - 1).bit_length()),), np.int32)
  idx[:len(blocks)] = blocks
  idx[len(blocks):] = blocks[0]
  return _poison_for((k_pool.sharding, v_pool.sharding))(k_pool, v_pool, idx)
