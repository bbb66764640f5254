"""Attention inside the compiled steps, through one switch (`RuntimeConfig.attention`):

  reference  pure-jnp gather of each sequence's block table (CPU default)
  pallas     the Pallas kernels of pallas_kernels/ (GPU default: Mosaic GPU on Hopper)
  interpret  the same Pallas kernels in interpret mode (CPU tests)

Decode attention returns (o, lse) so that partial attentions over disjoint keys (the host tier's
blocks, the summary rows) merge exactly by their log-sum-exp.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kvrm_jax.config import RuntimeConfig
from kvrm_jax.model import llama as model_lib
from kvrm_jax.step.block_ops import layer_view
from pallas_kernels import paged_attention


def resolve_attention(rt: RuntimeConfig) -> str:
  if rt.attention != "auto":
    return rt.attention
  return "pallas" if jax.default_backend() == "gpu" else "reference"


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
  kh, nl, n, bs, e = k_pool.shape
  q = jax.ShapeDtypeStruct((d["lengths"].shape[0], num_heads, e), k_pool.dtype)
  flat = jax.ShapeDtypeStruct((kh, nl * n, bs, e), k_pool.dtype)
  return paged_attention.decode_descriptors(q, flat, d["lengths"], d["block_tables"], d["groups"],
                                            d["num_groups"], **_attention_backend(backend))


def decode_attention(backend, q, k_pool, v_pool, layer, d, desc=None):
  """q: [S, H, E] -> (o [S, H, E] f32, lse [S, H]) over each slot's exact history (d['lengths']).

  desc: this step's `decode_descriptors` (the kernels read layer `layer` through a block offset)."""
  if backend in ("pallas", "interpret"):
    (kf, offset), (vf, _) = layer_view(k_pool, layer, 0), layer_view(v_pool, layer, 0)
    return paged_attention.paged_decode_attention(
        q, kf, vf, d["lengths"], d["block_tables"], d["groups"], d["num_groups"],
        block_offset=offset, desc=desc, return_lse=True, **_attention_backend(backend))
  k, v = gather_history(k_pool, layer, d["block_tables"]), gather_history(v_pool, layer, d["block_tables"])
  mask = jnp.arange(k.shape[2])[None, :] < d["lengths"][:, None]  # [S, Tk]
  o, lse = model_lib.attention(q[:, None], k, v, mask[:, None, :], return_lse=True)
  return o[:, 0], lse[:, 0]


def chunk_attention(q, k_pool, v_pool, layer, d):
  """Prefill: q [P, C, H, E] attends causally to its row's history (earlier chunks + itself).

  An XLA gather + einsum: prefill chunks are compute-bound matmuls XLA already tiles well."""
  k, v = gather_history(k_pool, layer, d["block_tables"]), gather_history(v_pool, layer, d["block_tables"])
  tk = jnp.arange(k.shape[2])[None, None, :]
  mask = (tk <= d["positions"][:, :, None]) & (tk < d["lengths"][:, None, None])  # [P, C, Tk]
  return model_lib.attention(q, k, v, mask)


def tile_attention(backend: str, prompt_attention: str, q, k_pool, v_pool, layer, d):
  """Prompt chunks: q [N, C, H, E] (tile n: C consecutive tokens of one sequence, from position
  d['positions'][n, 0]) attend causally to their history through d['block_tables'] up to
  d['lengths'] (RuntimeConfig.prompt_attention: the paged tile kernel, or chunk_attention)."""
  if prompt_attention != "kernel":
    return chunk_attention(q, k_pool, v_pool, layer, d)
  (kf, offset), (vf, _) = layer_view(k_pool, layer, 0), layer_view(v_pool, layer, 0)
  kw = _attention_backend(backend) if backend in ("pallas", "interpret") else dict(backend="reference")
  return paged_attention.paged_tile_attention(q, kf, vf, d["positions"][:, 0], d["lengths"], d["block_tables"],
                                              block_offset=offset, **kw)


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
